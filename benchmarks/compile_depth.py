r"""Compile time of a model forward + backward at 2 and 28 layers (scanned layers).

    python -m benchmarks.compile_depth

Small widths (d64, 4 query / 2 key-value heads of 16, MLP 128, vocabulary 512), 2 rows of
64 tokens, `jax.value_and_grad` of a loss on `transformer.logits`, default settings
(attention 'auto', remat 'full'). Lowering and XLA compilation are timed separately;
nothing is run. With the layers under `nn.scan` both should be flat in depth. Prints one
JSON line.
"""

from __future__ import annotations

import json
import time

import jax
import jax.numpy as jnp

from mopd_jax.models import transformer

WIDTHS = dict(vocab_size=512, embed_dim=64, num_heads=4, num_kv_heads=2, head_dim=16,
              mlp_dim=128, qk_norm=True)


def compile_times(num_layers: int) -> dict:
  cfg = transformer.ModelConfig(num_layers=num_layers, **WIDTHS)
  params = jax.eval_shape(lambda: transformer.init_params(cfg, jax.random.key(0)))
  tokens = jax.ShapeDtypeStruct((2, 64), jnp.int32)
  mask = jax.ShapeDtypeStruct((2, 64), bool)

  def loss(p, tokens, mask):
    logits = transformer.logits(cfg, p, tokens, mask)
    return jnp.mean(jax.nn.log_softmax(logits)[..., 0])

  start = time.perf_counter()
  lowered = jax.jit(jax.value_and_grad(loss)).lower(params, tokens, mask)
  lowered_at = time.perf_counter()
  lowered.compile()
  done = time.perf_counter()
  return {"lower_s": round(lowered_at - start, 2), "compile_s": round(done - lowered_at, 2)}


def main():
  result = {f"layers_{n}": compile_times(n) for n in (2, 28)}
  result["compile_ratio_28_vs_2"] = round(
      result["layers_28"]["compile_s"] / result["layers_2"]["compile_s"], 2)
  print(json.dumps(result))


if __name__ == "__main__":
  main()
