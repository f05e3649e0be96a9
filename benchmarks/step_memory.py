r"""Temporary memory of the compiled MOPD step at a real vocabulary size.

    python -m benchmarks.step_memory            # writes benchmarks/step_memory.json

The step never materialises float32 logits [rows, Lr, V]: the divergence is computed
from hidden states in sequence chunks under remat, so logits exist only as
[rows, chunk, V] at a time. This compiles (without running) the fused train step for
Qwen-size vocabulary 151,936, response length 1,024 and 16 rollouts (2 prompts x 8) on
a shallow model, and reads XLA's `compiled.memory_analysis()`.

Expected cost: one chunk of student + teacher logits and their log-softmax is about
rows * chunk * V * 4 bytes * (a few copies), vs rows * Lr * V * 4 = 9.96 GB for one
whole float32 logits tensor.
"""

from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from mopd_jax import peer_context, settings, sharding, teacher, train_step
from mopd_jax.models import transformer


def compile_step(*, vocab=151_936, response_len=1024, prompts=2, samples=8, chunk=32,
                 prompt_len=64, peer_cap=256, layers=2, embed=64):
  model = transformer.ModelConfig(vocab_size=vocab, num_layers=layers, embed_dim=embed,
                                  num_heads=4, num_kv_heads=2, head_dim=16, mlp_dim=4 * embed,
                                  qk_norm=True, tie_embeddings=True)
  cfg = train_step.StepConfig(
      model=model,
      sampling=settings.SamplingSettings(num_samples=samples, max_response_len=response_len),
      peers=settings.PeerSettings(peer_cap=peer_cap),
      loss=settings.LossSettings(chunk_size=chunk, top_k=100),
      teacher=settings.TeacherSettings(), optim=settings.OptimSettings(), stop_ids=(1,),
      pad_id=0)
  mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
  optimizer, _ = train_step.make_optimizer(settings.OptimSettings())
  params = jax.eval_shape(lambda: transformer.init_params(model, jax.random.PRNGKey(0)))
  state = jax.eval_shape(lambda p: train_step.TrainState(
      step=jnp.zeros((), jnp.int32), params=p, opt_state=optimizer.init(p),
      teacher_params=teacher.init_teacher(p), rng=jax.random.PRNGKey(0)), params)
  param_shardings = sharding.logical_to_shardings(transformer.param_logical_axes(model),
                                                  params, mesh)
  shardings = train_step.state_shardings(state, param_shardings, mesh, optimizer)
  pieces = peer_context.TemplatePieces(*[jnp.arange(n, dtype=jnp.int32) + 3
                                         for n in (6, 2, 8, 14, 18, 10)])

  def host(ids, tokens, lengths):
    n = len(ids)
    return (np.zeros(n, np.float32), np.zeros(n, np.int32), np.zeros((n, 1), np.int32),
            np.zeros(n, np.int32))

  step = train_step.make_train_step(cfg, mesh, host, optimizer, pieces, shardings)
  batch = {"prompt_tokens": jax.ShapeDtypeStruct((prompts, prompt_len), jnp.int32),
           "prompt_mask": jax.ShapeDtypeStruct((prompts, prompt_len), jnp.bool_),
           "insert_index": jax.ShapeDtypeStruct((prompts,), jnp.int32),
           "example_id": jax.ShapeDtypeStruct((prompts,), jnp.int32)}
  start = time.time()
  compiled = step.lower(state, batch).compile()
  stats = compiled.memory_analysis()
  rows = prompts * samples
  return {
      "vocab": vocab, "response_len": response_len, "rollouts": rows, "chunk": chunk,
      "temp_bytes": None if stats is None else int(stats.temp_size_in_bytes),
      "argument_bytes": None if stats is None else int(stats.argument_size_in_bytes),
      "float32_logits_bytes": rows * response_len * vocab * 4,
      "compile_s": time.time() - start,
      "device": jax.devices()[0].device_kind,
  }


def main():
  results = [compile_step(chunk=c) for c in (16, 32, 64, 128, 1024)]
  for r in results:
    print(f"chunk {r['chunk']:5d}: temp {r['temp_bytes'] / 2**30:.2f} GiB vs one float32 "
          f"logits tensor {r['float32_logits_bytes'] / 2**30:.2f} GiB "
          f"(compile {r['compile_s']:.0f}s, {r['device']})")
  with open(os.path.join(os.path.dirname(__file__), "step_memory.json"), "w") as f:
    json.dump(results, f, indent=1)


if __name__ == "__main__":
  main()
