r"""FLOPs per update, padded rows against packed rows (`config.optim.packed_tokens`).

    python -m benchmarks.packing_flops            # both distributions, a markdown table
    python -m benchmarks.packing_flops --skip-demo  # the long-tailed one only (seconds)

For each response-length distribution: real lengths of the student sequence (prompt +
response), the teacher sequence (teacher prompt + response) and the response of many
rows; budgets chosen from them by `packing.propose_budgets` (the 0.99 quantile over
resampled micro-batches); then the update's matmul FLOPs counted from its jaxpr
(`benchmarks.step_memory --flops-only`, loop trip counts included) with padded rows and
with those budgets, next to the analytic estimate

    FLOPs ~ 2 x layer params x (teacher tokens + 4 x student tokens)
          + 8 x D x V x loss positions
          + 4 x H x Dh x layers x (teacher rows x Lt^2 + 3.5 x student rows x Ls^2)

(tokens = rows x padded row length, packed or not: the student runs forward, forward
again under full remat, and backward (2x); the loss 4 vocabulary matmuls per position;
attention as `models.blockwise.blockwise` documents it, 4 x B x H x T x S x D forward, 10 x
forward + backward, plus the remat's forward, counting every key block: the jaxpr counts
the blocks that run-time skipping leaves out too, so both columns are upper bounds).

Distributions:
- `demo`: the demo (`configs/code.py`, demo base model): rollouts sampled from the demo
  base at the demo's settings (4 batches of 64 rows), teacher inputs assembled as the step
  does (`--save-demo-lengths` keeps the lengths).
- `long_tail`: qwen3-4b at the paper's caps (prompt 2048, response 4096, peer cap 2048,
  2S1F, no feedback block), prompts uniform in [256, 2048], responses exponential with
  mean 35% of the cap (clipped to [1, 4096]; measured mean given in the table), each
  teacher prompt = its prompt + three peer blocks min(peer response, 2048) of the same
  distribution + the template (about 60 tokens).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

TEMPLATE_TOKENS = 6 + 8 + 14 + 10  # step_memory's template pieces used by 2S1F


def long_tail_lengths(n: int, seed: int = 0):
  rng = np.random.default_rng(seed)
  cap, prompt_cap, peer_cap = 4096, 2048, 2048
  resp = np.clip(rng.exponential(0.35 * cap, n).astype(int), 1, cap)
  prompt = rng.integers(256, prompt_cap + 1, n)
  peers = np.clip(rng.exponential(0.35 * cap, (n, 3)).astype(int), 1, cap)
  teacher = prompt + np.minimum(peers, peer_cap).sum(1) + TEMPLATE_TOKENS + resp
  return prompt + resp, teacher, resp


def demo_lengths(batches: int = 4):
  """Lengths of rollouts the demo base samples at the demo's settings (configs/code.py)."""
  import jax  # pylint: disable=import-outside-toplevel

  from mopd_jax import step_teacher, train, train_step  # pylint: disable=import-outside-toplevel
  from benchmarks.configs import load_config  # pylint: disable=import-outside-toplevel

  s = train.setup(load_config())
  state = s.init_state()
  cfg = s.step_cfg
  inputs_fn = jax.jit(lambda b, r, k: step_teacher.build_teacher_inputs(cfg, s.pieces, b, r, k))
  out = {"student": [], "teacher": [], "response": []}
  for step in range(batches):
    batch = s.train_batches.batch(step)
    state = state.replace(step=state.step + 1)
    sample_key, peer_key = train_step.step_keys(state)
    sampled = jax.device_get(cfg.sampler(state.params, batch["prompt_tokens"],
                                         batch["prompt_mask"], sample_key))
    ids = np.repeat(batch["example_id"], cfg.num_samples)
    rewards, status, fb, fbl = s.host_verifier(ids, sampled.tokens, sampled.lengths)
    rollouts = train_step.Rollouts(tokens=sampled.tokens, logprobs=sampled.logprobs,
                                   lengths=sampled.lengths, finished=sampled.finished,
                                   rewards=rewards, status=status, feedback=fb,
                                   feedback_lengths=fbl)
    inputs = jax.device_get(inputs_fn(batch, rollouts, peer_key))
    resp = np.asarray(sampled.lengths)
    out["response"].append(resp)
    out["student"].append(np.asarray(inputs.prompt_mask).sum(1) + resp)
    out["teacher"].append(np.asarray(inputs.teacher_mask).sum(1) + resp)
  st = s.settings
  lr = st.sampling.max_response_len
  shape = dict(prompt_len=st.data.max_prompt_len, response_len=lr,
               peer_cap=st.peers.peer_cap, rows=st.rows, group=st.sampling.num_samples,
               model=s.model_cfg, student_row=inputs.prompt_tokens.shape[1] + lr,
               teacher_row=inputs.teacher_tokens.shape[1] + lr)
  return tuple(np.concatenate(out[k]) for k in ("student", "teacher", "response")), shape


def count(model, rows, group, prompt_len, response_len, peer_cap, micro_batch_rows,
          packed=(0, 0)):
  """`step_memory --flops-only` of `model` (a preset name or a ModelConfig), without the
  own-feedback block (neither distribution shows one)."""
  from benchmarks import step_memory  # pylint: disable=import-outside-toplevel
  argv = [f"--preset={model if isinstance(model, str) else 'demo'}", f"--rows={rows}",
          f"--group={group}", f"--prompt-len={prompt_len}",
          f"--response-len={response_len}", f"--peer-cap={peer_cap}",
          f"--micro-batch-rows={micro_batch_rows}", f"--packed-tokens={packed[0]}",
          f"--packed-teacher-tokens={packed[1]}", "--flops-only", "--dtype=float32",
          "--feedback-len=0"]
  args = step_memory.parse_args(argv)
  if isinstance(model, str):
    from mopd_jax.models import presets  # pylint: disable=import-outside-toplevel
    model = presets.get(model)
  return step_memory.compile_model_step(model, args)


def analytic(model, tokens_teacher, tokens_student, loss_positions, rows_teacher,
             rows_student, lt, ls):
  """FLOPs of the update from token counts (see the module docstring)."""
  d, v = model.embed_dim, model.vocab_size
  layer = model.num_params - v * d * (1 if model.tie_embeddings else 2) - d
  attn_unit = 4 * model.num_heads * model.head_dim * model.num_layers  # per (T x S)
  linear = 2 * layer * (tokens_teacher + 4 * tokens_student) + 8 * d * v * loss_positions
  # Teacher: forward only (4 units); student: forward, re-forward (remat) and backward
  # (4 + 4 + 10 - 4 recomputed = 14 units, as blockwise's docstring counts).
  attention = attn_unit * (rows_teacher * lt * lt + 14 / 4 * rows_student * ls * ls)
  return linear + attention


def study(name, lengths, shape, micro_batch_rows, model):
  student, teacher, response = lengths
  base = count(model, shape["rows"], shape["group"], shape["prompt_len"],
               shape["response_len"], shape["peer_cap"], micro_batch_rows)
  ls, lt = base["student_row"], base["teacher_row"]
  # Measured rows keep their padding when the benchmark's template pieces (token counts
  # of step_memory's stand-ins) make the padded row a few tokens longer or shorter.
  student = student + ls - shape.get("student_row", ls)
  teacher = teacher + lt - shape.get("teacher_row", lt)
  budgets = __import__("mopd_jax.packing", fromlist=["x"]).propose_budgets(
      student, teacher, response, student_row=ls, teacher_row=lt,
      response_row=shape["response_len"], micro_batch_rows=micro_batch_rows or shape["rows"])
  packed = count(model, shape["rows"], shape["group"], shape["prompt_len"],
                 shape["response_len"], shape["peer_cap"], micro_batch_rows, budgets)
  cfg = model if not isinstance(model, str) else \
      __import__("mopd_jax.models.presets", fromlist=["x"]).get(model)
  n, lr = shape["rows"], shape["response_len"]
  p, pt = budgets[0] // ls, budgets[1] // lt
  num = n // (micro_batch_rows or n)
  pad_est = analytic(cfg, n * lt, n * ls, n * lr, n, n, lt, ls)
  pack_est = analytic(cfg, num * pt * lt, num * p * ls, num * p * lr, num * pt, num * p, lt, ls)
  return {
      "distribution": name, "rows": n, "micro_batch_rows": micro_batch_rows or n,
      "student_row": ls, "teacher_row": lt,
      "response_mean": float(response.mean()), "response_cap": lr,
      "student_fill": float(student.mean() / ls), "teacher_fill": float(teacher.mean() / lt),
      "packed_tokens": budgets[0], "packed_teacher_tokens": budgets[1],
      "packed_rows": p, "packed_teacher_rows": pt,
      "padded_flops": base["update_flops"], "packed_flops": packed["update_flops"],
      "ratio": packed["update_flops"] / base["update_flops"],
      "padded_analytic": pad_est, "packed_analytic": pack_est,
      "ratio_analytic": pack_est / pad_est,
  }


def main(argv=None):
  # A host-side study (shapes, a tiny model's sampling): the CPU, even where libtpu is
  # installed (it would otherwise look for TPU hardware first).
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--save-demo-lengths", default="",
                 help="write the demo's sampled lengths to this .npz")
  p.add_argument("--skip-demo", action="store_true")
  args = p.parse_args(argv)
  results = []
  if not args.skip_demo:
    lengths, shape = demo_lengths()
    if args.save_demo_lengths:
      np.savez(args.save_demo_lengths, student=lengths[0], teacher=lengths[1],
               response=lengths[2])
    results.append(study("demo", lengths, shape, 0, shape["model"]))
  # The paper's batch (32 prompts x 8), with row micro-batches of 16, 32 and 64.
  shape = dict(prompt_len=2048, response_len=4096, peer_cap=2048, rows=256, group=8)
  for micro_batch_rows in (16, 32, 64):
    results.append(study("long_tail", long_tail_lengths(4096), shape, micro_batch_rows,
                         "qwen3-4b"))
  for r in results:
    print(json.dumps(r))
  sys.stdout.flush()


if __name__ == "__main__":
  main()
