"""`benchmarks.what_fits`: the parts that need no compile (meshes, the compiler's refusal,
FLOP counts, bounds, the summary's choice of micro-batch)."""

import pytest

from benchmarks import what_fits
from mopd_jax.models import presets


def test_default_mesh_splits_the_32_prompts_over_fsdp_and_the_rest_over_tensor():
  assert what_fits.chips_of("v5p:4x4x8") == 128
  assert what_fits.default_mesh(8) == (1, 8, 1)
  assert what_fits.default_mesh(64) == (1, 32, 2)
  assert what_fits.default_mesh(128) == (1, 32, 4)
  assert what_fits.Entry.parse("qwen3-4b,v6e:8x8,64,1x16x4").mesh == (1, 16, 4)
  with pytest.raises(ValueError, match="PRESET,TOPOLOGY"):
    what_fits.Entry.parse("qwen3-4b,v6e:8x8")


def test_refused_bytes_reads_the_compilers_figures_in_gib():
  message = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for "
             "HLO temporaries (35.04G) exceeds available HBM (15.75G).\nmore")
  assert what_fits.refused_bytes(message) == (int(35.04 * 2**30), int(15.75 * 2**30))
  assert what_fits.refused_bytes("INTERNAL: something else") is None


@pytest.mark.parametrize("name", ["Qwen3-1.7B", "Qwen3-8B"])
def test_per_token_flops_are_twice_the_matmul_parameters(name):
  m = presets.get(name)
  body, head = what_fits.per_token_flops(m)
  # Every parameter but the input embedding (when untied), the norms and the q/k norms
  # multiplies once per token.
  norms = m.num_layers * (2 * m.embed_dim + 2 * m.head_dim) + m.embed_dim
  embedding = 0 if m.tie_embeddings else m.vocab_size * m.embed_dim
  assert body + head == 2 * (m.num_params - embedding - norms)


def test_step_bounds_add_the_sampling_and_update_phases():
  line = {"device": "TPU v5", "chips": 4, "decode_weights_bytes": 1e9, "kv_cache_bytes": 2e9}
  peak, bandwidth = what_fits.PEAKS["TPU v5"]
  bounds = what_fits.step_bounds(line, {"sampling": 1e12, "update": 8e15})
  # Decode reads 1 GB of weights + 1 GB (half the cache) per token for 4,096 tokens,
  # which takes longer than the sampling FLOPs.
  assert bounds["sampling_s"] == pytest.approx(4096 * 2e9 / bandwidth)
  assert bounds["update_s"] == pytest.approx(8e15 / 4 / peak)
  assert bounds["step_s"] == pytest.approx(bounds["sampling_s"] + bounds["update_s"])


def test_summary_names_the_largest_micro_batch_that_fits_and_the_next_refused():
  head = {"preset": "qwen3-4b", "topology": "v5p:2x2x2", "chips": 8, "mesh": [1, 8, 1]}
  fit = {"fits": True, "total_bytes": 40 * 2**30, "device": "TPU v5",
         "decode_weights_bytes": 0, "kv_cache_bytes": 0}
  lines = [{**head, "micro_batch_rows": 0, "fits": False, "temp_bytes": 100 * 2**30,
            "compiler_hbm_bytes": 93 * 2**30, "compiler_refused": "..."},
           {**head, **fit, "micro_batch_rows": 32},
           {**head, **fit, "micro_batch_rows": 64},
           {**head, "micro_batch_rows": 128, "fits": False, "total_bytes": 99 * 2**30}]
  row = what_fits.summary(lines).splitlines()[2]
  assert row.startswith("| qwen3-4b | v5p:2x2x2 (8) | 64 | 40.0 / 95.0 | 128 |")
