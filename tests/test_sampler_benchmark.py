"""The sampler benchmark's roofline arithmetic against a count done step by step."""

import jax
import pytest

from benchmarks import sampler_vs_hf
from mopd_jax.models import transformer as T


@pytest.mark.parametrize("tied", [True, False])
def test_decode_bytes_per_step_counts_weights_and_cache(tied):
  cfg = T.ModelConfig(vocab_size=10, num_layers=2, embed_dim=4, num_heads=2, num_kv_heads=1,
                      head_dim=2, mlp_dim=8, tie_embeddings=tied)
  batch, prompt_len, new, itemsize = 3, 5, 4, 2
  per_step = []
  for written in range(1, new):  # decode step t feeds token t and reads t earlier ones
    weights = sum(x.size for x in jax.tree.leaves(T.init_params(cfg, jax.random.key(0))))
    if not tied:
      weights -= 10 * 4  # the embedding table is only looked up, row by row
    cache = 0
    for _ in range(cfg.num_layers):
      for row in range(batch):
        cache += 2 * cfg.num_kv_heads * cfg.head_dim * (prompt_len + written)
    per_step.append((weights + cache) * itemsize)
  got = sampler_vs_hf.decode_bytes_per_step(cfg, batch=batch, prompt_len=prompt_len,
                                            new_tokens=new, itemsize=itemsize)
  assert got == pytest.approx(sum(per_step) / len(per_step))


def test_peak_bandwidth_by_device_name():
  assert sampler_vs_hf.peak_bandwidth_gbs("NVIDIA H200") == 4800.0
  assert sampler_vs_hf.peak_bandwidth_gbs("NVIDIA H100 80GB HBM3") == 3350.0
  assert sampler_vs_hf.peak_bandwidth_gbs("NVIDIA H100 PCIe") == 2000.0
  assert sampler_vs_hf.peak_bandwidth_gbs("cpu") is None
