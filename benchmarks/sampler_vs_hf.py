r"""Sampler throughput against transformers `generate`, same weights, side by side.

    python -m benchmarks.sampler_vs_hf
    python -m benchmarks.sampler_vs_hf --embed-dim=1024 --layers=28 --heads=16 \
        --kv-heads=8 --head-dim=128 --mlp-dim=3072 --vocab=151936 --dtype=bfloat16 \
        --batch=64 --prompt-len=128 --new-tokens=256      # Qwen3-0.6B shape, on a GPU

A random Qwen3-shaped model (d512, 8 layers, 8 query / 4 key-value heads of 64, MLP 1536,
vocabulary 32,000, float32, by default; flags change the shape and dtype) is built and saved by transformers, loaded by `hf_import`, and
both sides sample 128 new tokens (temperature 1, no top-k / top-p, no early stop) for a
batch of 16 prompts of 32 tokens. Each side runs once to warm up (our side: compile), then
both run `--repeats` times, alternating, and the medians are reported. Prints one JSON
line with tokens per second of both sides and their ratio.

Expected cost per new token and row: 2 * 41M FLOPs (weights, LM head included), and every
step reads all 164 MB of float32 weights once for the whole batch, so at batch 16 both
sides are bound by weight reads plus per-step overhead.
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

  # The stop id lies outside the vocabulary: every row runs all `new` tokens, as below.
  sampler = Sampler(config, max_new_tokens=new, stop_ids=(vocab,), pad_id=0, temperature=1.0)
  sample = jax.jit(sampler.__call__)
  keys = iter(range(1, 1_000))

  def ours():
    out = sample(params, prompts, mask, jax.random.key(next(keys)))
    jax.block_until_ready(out)
    assert int(out.lengths.min()) == new

  def theirs():
    with torch.no_grad():
      out = model.generate(
          torch.from_numpy(prompts).to(device),
          attention_mask=torch.from_numpy(mask.astype(np.int64)).to(device),
          do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=new,
          min_new_tokens=new, eos_token_id=None, pad_token_id=0)
    assert out.shape == (args.batch, args.prompt_len + new)

  (ours_warmup, ours_s), (theirs_warmup, theirs_s) = _timed_side_by_side(
      (ours, theirs), args.repeats)
  tokens = args.batch * new
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
  }))


if __name__ == "__main__":
  main()
