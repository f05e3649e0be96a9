r"""Calibration of the demo's base model (or its external teacher) before any training.

    python -m benchmarks.base_calibration                # the base model
    python -m benchmarks.base_calibration --teacher      # the external teacher

Measures, with the demo configuration's sampler (temperature 1, responses <= 40 tokens):

- the success rate in the student format (the plain prompt) on the first `--prompts`
  training problems and on the first `--prompts` held-out problems, `--samples` rollouts
  each;
- on those held-out rollouts, how well the model's own scores (mean per-token log-prob
  of each rollout) under each context variant (`analysis.context_scores`: no context,
  1S, 2S, 1S1F, 2S1F) separate successes from failures: `teacher_signal.alignment` over
  the prompts with both outcomes, with prompt-level bootstrap 95% intervals.

Prints one JSON object (also written to `--out` if given).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import jax
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = ("base", "1S", "2S", "1S1F", "2S1F")


def demo_config(teacher: bool, prompts: int, samples: int):
  sys.path.insert(0, ROOT)
  from tests.conftest import load_config  # pylint: disable=import-outside-toplevel
  from mopd_jax import demo_base  # pylint: disable=import-outside-toplevel
  config = load_config("code")
  base = demo_base.default_dir()
  if teacher:
    demo_base.ensure_teacher(base)
    config.model.cache_dir = demo_base.teacher_dir(base)
    config.data.cache_dir = os.path.join(base, "data")
  config.sampling.num_samples = samples
  config.eval.num_prompts = prompts
  return config


def train_success(config, prompts: int, seed: int = 0) -> float:
  from mopd_jax import train_setup  # pylint: disable=import-outside-toplevel
  s = train_setup.setup(config)
  batch = s.train_batches.first(prompts)
  cfg = s.step_cfg
  with jax.set_mesh(s.mesh):
    out = jax.device_get(jax.jit(cfg.sampler.__call__)(
        s.base_params, batch["prompt_tokens"], batch["prompt_mask"],
        jax.random.PRNGKey(seed)))
  ids = np.repeat(batch["example_id"], cfg.num_samples)
  rewards = s.host_verifier(ids, out.tokens, out.lengths)[0]
  return float(np.mean(rewards >= s.settings.verifier.success_threshold))


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--teacher", action="store_true", help="the external teacher")
  p.add_argument("--prompts", type=int, default=96)
  p.add_argument("--samples", type=int, default=8)
  p.add_argument("--out", default=None)
  args = p.parse_args(argv)
  from mopd_jax.analysis import context_scores  # pylint: disable=import-outside-toplevel
  config = demo_config(args.teacher, args.prompts, args.samples)
  result = {"model": "teacher" if args.teacher else "base", "prompts": args.prompts,
            "samples": args.samples,
            "train_success": train_success(config, args.prompts)}
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "rollouts.npz")
    report = context_scores.analyse(config, path, sample_prompts=args.prompts,
                                    variants=VARIANTS)
    rewards = context_scores.load_rollouts(path)[1]["rewards"]
  result["heldout_success"] = float(np.mean(rewards >= 1.0))
  result["variants"] = {
      name: {k: v[k] for k in ("auc", "pairwise_accuracy", "spearman", "num_prompts", "ci95")}
      for name, v in report["variants"].items()}
  text = json.dumps(result, indent=1)
  print(text)
  if args.out:
    with open(args.out, "w", encoding="utf-8") as f:
      f.write(text + "\n")


if __name__ == "__main__":
  main()
