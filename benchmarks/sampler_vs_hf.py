r"""Sampler throughput against transformers `generate`, same weights, side by side.

    python -m benchmarks.sampler_vs_hf
    python -m benchmarks.sampler_vs_hf --embed-dim=1024 --layers=28 --heads=16 \
        --kv-heads=8 --head-dim=128 --mlp-dim=3072 --vocab=151936 --dtype=bfloat16 \
        --batch=64 --prompt-len=128 --new-tokens=256      # Qwen3-0.6B shape, on a GPU

A random Qwen3-shaped model (d512, 8 layers, 8 query / 4 key-value heads of 64, MLP 1536,
vocabulary 32,000, float32, by default; flags change the shape and dtype) is built and
saved by transformers, loaded by `hf_import`, and both sides sample 128 new tokens
(temperature 1, no top-k / top-p, no early stop) for a batch of 16 prompts of 32 tokens.
Each side runs once to warm up (our side: compile), then both run `--repeats` times,
alternating, and the medians are reported. Prints one JSON line with tokens per second of
both sides and their ratio.

Expected cost per new token and row: 2 * 41M FLOPs (weights, LM head included), and every
step reads all 164 MB of float32 weights once for the whole batch, so at batch 16 both
sides are bound by weight reads plus per-step overhead.

Roofline. A decode step must read every weight once (the tied embedding once, as the
output head) and the keys and values of every cached token: the prompt's once per prompt,
each row's own response so far. `bytes_per_step` is that minimum averaged over the steps,
`achieved_gbs` it divided by our time per generated token (prefill included, so the
figure is conservative), and `roofline_fraction` that over the device's peak memory
bandwidth: `--peak-gbs`, or a known GPU's from its name (none on CPU unless given).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import jax
import numpy as np
import torch
import transformers

from mopd_jax.models import hf_import
from mopd_jax.sampling import Sampler



# Peak memory bandwidth (GB/s) by GPU name, from the vendors' data sheets; the first match
# of a lower-case substring of `device_kind` wins.
PEAK_GBS = (("h200", 4800.0), ("h100 pcie", 2000.0), ("h100 nvl", 3900.0), ("h100", 3350.0),
            ("a100-sxm4-80gb", 2039.0), ("a100 80gb", 1935.0), ("a100", 1555.0))


def peak_bandwidth_gbs(device_kind: str):
  """Peak memory bandwidth of a known GPU in GB/s, else None."""
  kind = device_kind.lower()
  return next((gbs for name, gbs in PEAK_GBS if name in kind), None)


def decode_bytes_per_step(config, *, batch: int, prompt_len: int, new_tokens: int,
                          itemsize: int) -> float:
  """Bytes a decode step must read, averaged over the `new_tokens - 1` decode steps.

  Weights once (a tied embedding once, as the head; an untied one only by its looked-up
  rows, not counted), the prompt cache once per prompt, and each row's response keys and
  values written so far.
  """
  weights = config.num_params
  if not config.tie_embeddings:
    weights -= config.vocab_size * config.embed_dim
  per_token = config.num_layers * config.num_kv_heads * config.head_dim * 2 * itemsize
  steps = max(new_tokens - 1, 1)
  mean_written = sum(range(1, new_tokens)) / steps
  return weights * itemsize + per_token * batch * (prompt_len + mean_written)


def _timed_side_by_side(fns, repeats):
  """Per function: (seconds of its first call, median seconds of `repeats` later calls).

  The later calls alternate between the functions, so that both see the same machine load.
  """
  first, times = [], [[] for _ in fns]
  for fn in fns:
    start = time.perf_counter()
    fn()
    first.append(time.perf_counter() - start)
  for _ in range(repeats):
    for fn, record in zip(fns, times):
      start = time.perf_counter()
      fn()
      record.append(time.perf_counter() - start)
  return [(f, statistics.median(t)) for f, t in zip(first, times)]


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--prompt-len", type=int, default=32)
  parser.add_argument("--new-tokens", type=int, default=128)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--embed-dim", type=int, default=512)
  parser.add_argument("--layers", type=int, default=8)
  parser.add_argument("--heads", type=int, default=8)
  parser.add_argument("--kv-heads", type=int, default=4)
  parser.add_argument("--head-dim", type=int, default=64)
  parser.add_argument("--mlp-dim", type=int, default=1536)
  parser.add_argument("--vocab", type=int, default=32_000)
  parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
  parser.add_argument("--decode-layers", default="scan",
                      help="Sampler.decode_layers, or several separated by commas: each is "
                      "timed side by side; the first one's figures are the headline")
  parser.add_argument("--peak-gbs", type=float, default=None,
                      help="peak memory bandwidth in GB/s (default: known GPUs by name)")
  args = parser.parse_args()

  shape = dict(vocab_size=args.vocab, hidden_size=args.embed_dim,
               num_hidden_layers=args.layers, num_attention_heads=args.heads,
               num_key_value_heads=args.kv_heads, head_dim=args.head_dim,
               intermediate_size=args.mlp_dim, tie_word_embeddings=True)
  torch.manual_seed(0)
  model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**shape)).eval()
  with tempfile.TemporaryDirectory() as directory:
    model.save_pretrained(directory, safe_serialization=True)
    config, params = hf_import.load(directory, dtype=args.dtype)
  device = "cuda" if torch.cuda.is_available() else "cpu"
  model = model.to(device=device, dtype=getattr(torch, args.dtype))

  vocab = args.vocab
  prompts = np.random.default_rng(0).integers(1, vocab, (args.batch, args.prompt_len))
  mask = np.ones_like(prompts, dtype=bool)
  new = args.new_tokens

  keys = iter(range(1, 1_000))

  def ours(decode_layers):
    # The stop id lies outside the vocabulary: every row runs all `new` tokens, as below.
    sample = jax.jit(Sampler(config, max_new_tokens=new, stop_ids=(vocab,), pad_id=0,
                             temperature=1.0, decode_layers=decode_layers).__call__)

    def run():
      out = sample(params, prompts, mask, jax.random.key(next(keys)))
      jax.block_until_ready(out)
      assert int(out.lengths.min()) == new
    return run

  def theirs():
    with torch.no_grad():
      out = model.generate(
          torch.from_numpy(prompts).to(device),
          attention_mask=torch.from_numpy(mask.astype(np.int64)).to(device),
          do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=new,
          min_new_tokens=new, eos_token_id=None, pad_token_id=0)
    assert out.shape == (args.batch, args.prompt_len + new)

  variants = args.decode_layers.split(",")
  *timed, (theirs_warmup, theirs_s) = _timed_side_by_side(
      [ours(v) for v in variants] + [theirs], args.repeats)
  (ours_warmup, ours_s) = timed[0]
  tokens = args.batch * new
  device_kind = jax.devices()[0].device_kind
  peak = args.peak_gbs or peak_bandwidth_gbs(device_kind)
  step_bytes = decode_bytes_per_step(config, batch=args.batch, prompt_len=args.prompt_len,
                                     new_tokens=new,
                                     itemsize=jax.numpy.dtype(args.dtype).itemsize)
  achieved = step_bytes / (ours_s / new) / 1e9
  print(json.dumps({
      "batch": args.batch, "prompt_len": args.prompt_len, "new_tokens": new,
      "dtype": args.dtype, "torch_device": device,
      "num_params": config.num_params, "backend": jax.default_backend(),
      "torch_threads": torch.get_num_threads(),
      "mopd_jax_tokens_per_s": round(tokens / ours_s, 1),
      "transformers_tokens_per_s": round(tokens / theirs_s, 1),
      "ratio": round(theirs_s / ours_s, 2),
      "mopd_jax_s": round(ours_s, 3), "transformers_s": round(theirs_s, 3),
      "mopd_jax_first_call_s": round(ours_warmup, 2),
      "transformers_first_call_s": round(theirs_warmup, 2),
      "device_kind": device_kind, "bytes_per_step": round(step_bytes),
      "achieved_gbs": round(achieved, 1), "peak_gbs": peak,
      "roofline_fraction": round(achieved / peak, 3) if peak else None,
      "decode_layers": variants[0],
      "tokens_per_s_by_decode_layers": {
          v: round(tokens / t, 1) for v, (_, t) in zip(variants, timed)},
  }))


if __name__ == "__main__":
  main()
