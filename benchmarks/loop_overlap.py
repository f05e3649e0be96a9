r"""Step time of the training loop that waits for every step against the one that does not.

    python -m benchmarks.loop_overlap                  # the demo config (configs/code.py)
    python -m benchmarks.loop_overlap --batch_size=32 --max_response_len=64   # larger

"wait" is the loop as it was: each step's metrics fetched (`jax.device_get`) right after
it is launched, and every checkpoint save waited for until its files are on disk. "late"
is `train.run`'s loop: step k+1 launched before step k's metrics are read
(`train._LateMetrics`) and saves left to orbax's background thread. One process compiles
the step once; blocks of --steps steps then alternate (wait, late, wait, late, ...) from
the same state, so machine drift reaches both loops alike. Both write metrics.jsonl and
save a checkpoint every --save_every steps. Prints JSON with the median seconds per step
of each loop and their ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import jax


def _wait_block(s, compiled, state, step, steps, writer, ckpt, save_every):
  for _ in range(steps):
    state, m = compiled(state, s.batch(step))
    step += 1
    m = jax.device_get(m)
    m.update(s.host_verifier.pop_timing())
    writer.write(step, m)
    if step % save_every == 0:
      ckpt.save(step, state, {"data_position": step})
      ckpt.wait()
  return state, step


def _late_block(s, compiled, state, step, steps, late, ckpt, save_every):
  for _ in range(steps):
    batch = s.batch(step)
    launched = time.time()
    state, m = compiled(state, batch)
    step += 1
    late.push(step, m, launched)
    if step % save_every == 0:
      late.flush()
      ckpt.save(step, state, {"data_position": step})
  late.flush()
  return state, step


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--steps", type=int, default=6, help="steps per block")
  parser.add_argument("--blocks", type=int, default=3, help="blocks of each loop")
  parser.add_argument("--save_every", type=int, default=3)
  parser.add_argument("--batch_size", type=int, default=0, help="prompts per step (0: config)")
  parser.add_argument("--max_response_len", type=int, default=0, help="0: the config's")
  args = parser.parse_args()
  jax.config.update("jax_platforms", "cpu")
  from mopd_jax import checkpointing, metrics, settings, train  # pylint: disable=import-outside-toplevel
  from benchmarks.configs import load_config  # pylint: disable=import-outside-toplevel
  overrides = {"total_steps": 10**6, "log_every": 1}
  if args.batch_size:
    overrides["data.batch_size"] = args.batch_size
  if args.max_response_len:
    overrides["sampling.max_response_len"] = args.max_response_len
  st = settings.from_config(load_config(**overrides))
  s = train.setup(st)
  compiled, _ = s.compile_step()
  state, step = s.init_state(), 0
  state, step = _wait_block(s, compiled, state, step, 1, metrics.MetricWriter(
      tempfile.mkdtemp(), tensorboard=False, active=False), None, 10**9)  # warm-up
  per_step = {"wait": [], "late": []}
  with tempfile.TemporaryDirectory() as scratch:
    for block in range(args.blocks):
      for mode in ("wait", "late"):
        workdir = os.path.join(scratch, f"{mode}{block}")
        writer = metrics.MetricWriter(workdir, tensorboard=False)
        ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"), every=0)
        start = time.time()
        if mode == "wait":
          state, step = _wait_block(s, compiled, state, step, args.steps, writer, ckpt,
                                    args.save_every)
        else:
          late = train._LateMetrics(st, s.schedule, s.host_verifier, writer,  # pylint: disable=protected-access
                                    metrics.Progress(st.run.total_steps, active=False))
          state, step = _late_block(s, compiled, state, step, args.steps, late, ckpt,
                                    args.save_every)
        ckpt.wait()  # the last save's write counts in its block
        per_step[mode].append((time.time() - start) / args.steps)
        ckpt.close()
        writer.close()
  wait, late = statistics.median(per_step["wait"]), statistics.median(per_step["late"])
  print(json.dumps({"config": {"batch_size": st.data.batch_size,
                               "num_samples": st.sampling.num_samples,
                               "max_response_len": st.sampling.max_response_len,
                               "steps_per_block": args.steps, "blocks": args.blocks,
                               "save_every": args.save_every},
                    "seconds_per_step": per_step, "median_wait_s": wait,
                    "median_late_s": late, "wait_over_late": wait / late}, indent=1))


if __name__ == "__main__":
  main()
