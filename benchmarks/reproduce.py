r"""The paper's comparison on the demo task, at equal rollout budget, over seeds.

    python -m benchmarks.reproduce            # the study (about an hour on 2 cores)
    python -m benchmarks.reproduce --quick    # the same pipeline in a few minutes

Methods (one `python -m mopd_jax.main --config=configs/code.py` run each; every run
samples the same number of rollouts: data.batch_size x sampling.num_samples per step;
each keeps the authors' defaults of its algorithm unless its name says otherwise):

- `mopd_2s1f`: MOPD with the 2S1F peer context and the EMA self-teacher (own feedback
  on, shown only without a solution);
- `mopd_2s1f_frozen`, `mopd_2s1f_trust_region`: the same with a frozen teacher (the
  initial student) and with the trust-region teacher;
- `mopd_1s`, `mopd_2s`, `mopd_1s1f`: MOPD with smaller peer contexts;
- `sdpo_feedback`, `sdpo_no_feedback`: SDPO (the primary success; the rollout's own
  feedback without one, or no feedback);
- `opd_large_teacher`: classic on-policy distillation (reverse KL, the teacher reading the
  plain prompt) from the larger demo model (`teacher.checkpoint = 'demo'`);
- `mopd_external`: MOPD 2S1F with that larger model as its (fixed) teacher;
- `grpo`: GRPO (group-relative advantages, clipped ratio, no KL);
- `sft_verified`: verified SFT on the rollouts that pass.

The main five (`MAIN_METHODS`: MOPD 2S1F, SDPO with feedback, OPD, GRPO, SFT) run with
`--seeds` (default 0, 1, 2), the others with `--extra-seeds` (default 0).

Then the teacher-signal analysis: the base model samples `--signal-samples` rollouts per
held-out prompt, they are verified and saved, and the base model (the teacher of every
self-distillation run at step 0) scores each one under each context variant
(`mopd_jax.analysis.context_scores`); `teacher_signal.alignment` compares the scores with
the rewards per prompt, with prompt-level bootstrap 95% intervals.

Writes, under `--out` (default `benchmarks/reproduction`): `results.json` (every run's
curves and summaries, the aggregates and the analysis), `results.md` (the tables) and
`train_reward.png`, `heldout_success.png` (not committed: `--plots-only` draws them again
from `results.json`). Runs live in `--workdir`; a run whose
`summary.json` exists is not run again, so an interrupted study resumes.

Knobs that set the cost: `--steps` (per run), `--eval-every`, `--seeds`, `--methods`,
`--eval-prompts`; the demo's own settings (16 prompts x 4 rollouts per step, responses
<= 40 tokens) are kept.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_SDPO = {"algorithm.name": "sdpo", "peers.include_another": False,
         "peers.include_failure": False}
_LARGE_TEACHER = {"teacher.mode": "external", "teacher.checkpoint": "demo",
                  "teacher.param_dtype": "float32"}
METHODS = {
    "mopd_2s1f": {"algorithm.name": "mopd"},
    "sdpo_feedback": {**_SDPO, "peers.include_feedback": True},
    "opd_large_teacher": {"algorithm.name": "opd", **_LARGE_TEACHER, "loss.alpha": 1.0},
    "grpo": {"algorithm.name": "grpo"},
    "sft_verified": {"algorithm.name": "sft"},
    "mopd_2s1f_frozen": {"algorithm.name": "mopd", "teacher.mode": "frozen"},
    "mopd_2s1f_trust_region": {"algorithm.name": "mopd", "teacher.mode": "trust_region"},
    "mopd_1s": {"algorithm.name": "mopd", "peers.include_another": False,
                "peers.include_failure": False},
    "mopd_2s": {"algorithm.name": "mopd", "peers.include_failure": False},
    "mopd_1s1f": {"algorithm.name": "mopd", "peers.include_another": False},
    "sdpo_no_feedback": {**_SDPO, "peers.include_feedback": False},
    "mopd_external": {"algorithm.name": "mopd", **_LARGE_TEACHER},
}
# Run with --seeds; every other method with --extra-seeds.
MAIN_METHODS = ("mopd_2s1f", "sdpo_feedback", "opd_large_teacher", "grpo", "sft_verified")

# Student's t quantile t(0.975, df) for the 95% interval of a mean over seeds.
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
         9: 2.262, 10: 2.228}


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--quick", action="store_true",
                 help="1 seed, 8 steps, 32 held-out prompts: the pipeline in minutes")
  p.add_argument("--methods", default=",".join(METHODS),
                 help=f"comma-separated subset of {tuple(METHODS)}")
  p.add_argument("--seeds", default=None,
                 help=f"comma-separated seeds of {MAIN_METHODS} (default 0,1,2)")
  p.add_argument("--extra-seeds", default="0",
                 help="comma-separated seeds of the other methods (default 0)")
  p.add_argument("--steps", type=int, default=None, help="steps per run (default 60)")
  p.add_argument("--eval-every", type=int, default=None, help="default 10")
  p.add_argument("--eval-prompts", type=int, default=None, help="default 96")
  p.add_argument("--signal-prompts", type=int, default=None, help="default 96")
  p.add_argument("--signal-samples", type=int, default=8)
  p.add_argument("--out", default=None,
                 help="default benchmarks/reproduction (with --quick: under --workdir)")
  p.add_argument("--workdir", default=None,
                 help="runs and saved rollouts (default: the temporary directory's "
                 "mopd_reproduce or mopd_reproduce_quick)")
  p.add_argument("--run-timeout", type=int, default=3600, help="seconds per run")
  p.add_argument("--plots-only", action="store_true",
                 help="only draw the plots from the results.json already in --out")
  args = p.parse_args(argv)
  quick = args.quick
  defaults = dict(seeds="0" if quick else "0,1,2", steps=8 if quick else 60,
                  eval_every=4 if quick else 10, eval_prompts=32 if quick else 96,
                  signal_prompts=32 if quick else 96)
  for name, value in defaults.items():
    if getattr(args, name) is None:
      setattr(args, name, value)
  if args.workdir is None:
    args.workdir = os.path.join(tempfile.gettempdir(),
                                "mopd_reproduce_quick" if quick else "mopd_reproduce")
  if args.out is None:
    args.out = (os.path.join(args.workdir, "results") if quick
                else os.path.join(ROOT, "benchmarks", "reproduction"))
  args.methods = [m for m in args.methods.split(",") if m]
  unknown = [m for m in args.methods if m not in METHODS]
  if unknown:
    p.error(f"--methods: unknown {unknown}; allowed: {tuple(METHODS)}")
  for name in ("seeds", "extra_seeds"):
    try:
      setattr(args, name, [int(s) for s in str(getattr(args, name)).split(",") if s != ""])
    except ValueError:
      p.error(f"--{name.replace('_', '-')} must be comma-separated integers, got "
              f"{getattr(args, name)!r}")
  for name in ("steps", "eval_prompts", "signal_prompts", "signal_samples"):
    if getattr(args, name) <= 0:
      p.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
  if not args.seeds or not args.extra_seeds:
    p.error("--seeds and --extra-seeds: give at least one seed each")
  return args


def seeds_of(args, method: str) -> list[int]:
  """The seeds `method` runs with: --seeds for the main five, --extra-seeds otherwise."""
  return args.seeds if method in MAIN_METHODS else args.extra_seeds


def run_overrides(args, method: str, seed: int) -> dict:
  """The `--config.KEY=VALUE` overrides of one run."""
  return {"seed": seed, "total_steps": args.steps, "eval_every": args.eval_every,
          "checkpoint_every": 0, "eval.num_prompts": args.eval_prompts, **METHODS[method]}


def run_one(args, method: str, seed: int) -> dict:
  """Runs (or finds) one training run; returns its record."""
  workdir = os.path.join(args.workdir, method, f"seed{seed}")
  summary_path = os.path.join(workdir, "summary.json")
  overrides = run_overrides(args, method, seed)
  overrides_path = os.path.join(workdir, "overrides.json")
  if os.path.exists(overrides_path):
    with open(overrides_path, encoding="utf-8") as f:
      saved = json.load(f)
    if saved != json.loads(json.dumps(overrides)):
      raise SystemExit(f"{workdir} holds a run with other settings ({saved}); this study "
                       f"wants {overrides}. Pass another --workdir.")
  if not os.path.exists(summary_path):
    os.makedirs(workdir, exist_ok=True)
    with open(overrides_path, "w", encoding="utf-8") as f:
      json.dump(overrides, f)
    command = [sys.executable, "-m", "mopd_jax.main", "--config=configs/code.py",
               f"--workdir={workdir}"] + [f"--config.{k}={v}" for k, v in overrides.items()]
    print(f"[reproduce] {method} seed {seed}: {' '.join(command[1:])}", flush=True)
    start = time.time()
    with open(os.path.join(workdir, "log.txt"), "w", encoding="utf-8") as log:
      try:
        rc = subprocess.run(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                            timeout=args.run_timeout, check=False).returncode
      except subprocess.TimeoutExpired:
        rc = "timeout"
    print(f"[reproduce]   finished in {time.time() - start:.0f} s (exit {rc})", flush=True)
    if rc != 0 or not os.path.exists(summary_path):
      return {"method": method, "seed": seed, "failed": f"exit {rc}, see "
              f"{os.path.join(workdir, 'log.txt')}", "overrides": overrides}
  return read_run(workdir, method, seed, overrides)


def read_run(workdir: str, method: str, seed: int, overrides: dict) -> dict:
  """Curves and summary of a finished run from its metrics.jsonl and summary.json."""
  with open(os.path.join(workdir, "summary.json"), encoding="utf-8") as f:
    summary = json.load(f)
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    records = [json.loads(line) for line in f if line.strip()]
  train = [(r["step"], r["train/reward_mean"]) for r in records if "train/reward_mean" in r]
  evals = [r for r in records if "eval/success_rate" in r]
  k = max(int(key.split("@")[1]) for key in evals[0] if key.startswith("eval/pass@"))
  return {
      "method": method, "seed": seed, "overrides": overrides,
      "train_reward": [[s, v] for s, v in train],
      "heldout": [{"step": r["step"], "success": r["eval/success_rate"],
                   f"pass@{k}": r[f"eval/pass@{k}"]} for r in evals],
      "k": k,
      "success_before": summary["eval_before"]["eval/success_rate"],
      "success_after": summary["eval_after"]["eval/success_rate"],
      "pass_before": summary["eval_before"][f"eval/pass@{k}"],
      "pass_after": summary["eval_after"][f"eval/pass@{k}"],
      "wall_time_s": summary["wall_time_s"],
      "step_time_median_s": summary["step_time_median_s"],
      "compile_time_s": summary["compile_time_s"],
  }


def mean_ci(values) -> dict:
  """Mean over seeds and its 95% t-interval (None with fewer than two values)."""
  values = [float(v) for v in values]
  if not values:
    return {"mean": None, "ci95": None, "n": 0}
  mean = float(np.mean(values))
  if len(values) < 2:
    return {"mean": mean, "ci95": None, "n": len(values)}
  df = len(values) - 1
  half = _T975.get(df, 1.96) * float(np.std(values, ddof=1)) / math.sqrt(len(values))
  return {"mean": mean, "ci95": [mean - half, mean + half], "n": len(values)}


def aggregate(runs: list[dict]) -> dict:
  """Per method: held-out success and pass@k after training (mean and 95% CI over seeds),
  their change from before, late training reward, and mean curves."""
  out = {}
  for method in dict.fromkeys(r["method"] for r in runs):
    ok = [r for r in runs if r["method"] == method and "failed" not in r]
    failed = [r["seed"] for r in runs if r["method"] == method and "failed" in r]
    entry = {"seeds": [r["seed"] for r in ok], "failed_seeds": failed}
    if ok:
      k = ok[0]["k"]
      entry["k"] = k
      entry["success_after"] = mean_ci([r["success_after"] for r in ok])
      entry["success_gain"] = mean_ci([r["success_after"] - r["success_before"] for r in ok])
      entry[f"pass@{k}_after"] = mean_ci([r["pass_after"] for r in ok])
      entry["success_before"] = mean_ci([r["success_before"] for r in ok])
      late = []
      for r in ok:
        values = [v for _, v in r["train_reward"]]
        late.append(float(np.mean(values[-max(1, len(values) // 6):])))
      entry["train_reward_late"] = mean_ci(late)
      entry["wall_time_s"] = mean_ci([r["wall_time_s"] for r in ok])
      entry["train_reward_curve"] = _mean_curve([r["train_reward"] for r in ok])
      entry["heldout_curve"] = _mean_curve(
          [[[e["step"], e["success"]] for e in r["heldout"]] for r in ok])
    out[method] = entry
  return out


def method_rows(aggregates: dict) -> list[dict]:
  """`results.json`'s per-method summary: held-out success after training (mean and 95%
  interval over seeds) and pass@k, one row per method that finished a run."""
  rows = []
  for method, a in aggregates.items():
    if "success_after" not in a:
      continue
    k = a["k"]
    rows.append({"method": method, "seeds": a["seeds"],
                 "heldout_success_mean": a["success_after"]["mean"],
                 "heldout_success_ci": a["success_after"]["ci95"],
                 "pass_at_k": {"k": k, "mean": a[f"pass@{k}_after"]["mean"],
                               "ci": a[f"pass@{k}_after"]["ci95"]}})
  return rows


def teacher_signal_rows(signal: dict) -> list[dict]:
  """`results.json`'s teacher-signal summary: one row per context, its AUC and the
  prompt-level bootstrap 95% interval."""
  return [{"context": name, "auc": v["auc"], "auc_ci": v["ci95"]["auc"],
           "num_prompts": v["num_prompts"]} for name, v in signal["variants"].items()]


def _mean_curve(curves) -> list:
  """[[step, mean over runs]] at the steps every run has."""
  steps = sorted(set.intersection(*(set(s for s, _ in c) for c in curves)))
  return [[s, float(np.mean([dict(c)[s] for c in curves]))] for s in steps]


def _run_curve(run: dict, key: str) -> list:
  """[[step, value]] of one run for an aggregate curve key."""
  if key == "train_reward_curve":
    return run["train_reward"]
  return [[e["step"], e["success"]] for e in run["heldout"]]


def seed_spread(runs: list[dict], method: str, key: str):
  """(lows, highs) over the seeds of `method` at the steps of its mean curve `key`, or
  None with fewer than two seeds."""
  curves = [dict(_run_curve(r, key)) for r in runs
            if r["method"] == method and "failed" not in r]
  if len(curves) < 2:
    return None
  steps = sorted(set.intersection(*(set(c) for c in curves)))
  values = np.asarray([[c[s] for c in curves] for s in steps], np.float64)  # [steps, seeds]
  return values.min(axis=1).tolist(), values.max(axis=1).tolist()


def _moving_average(values, width=5):
  return np.convolve(values, np.ones(width) / width, mode="valid")


def ordering(aggregates: dict) -> list[str]:
  """Methods by mean held-out success after training, best first."""
  ranked = [(m, a["success_after"]["mean"]) for m, a in aggregates.items()
            if "success_after" in a]
  return [m for m, _ in sorted(ranked, key=lambda x: -x[1])]


def demo_config():
  """`get_config()` of configs/code.py (the demo)."""
  from benchmarks import configs  # pylint: disable=import-outside-toplevel
  return configs.load_config("code")


def teacher_signal_study(args) -> dict:
  """Samples, verifies and saves base-model rollouts on held-out prompts, then scores
  them under every context variant with the base model as the teacher."""
  # Imported here so that `--help` and the aggregation functions need no JAX.
  from mopd_jax.analysis import context_scores  # pylint: disable=import-outside-toplevel

  start = time.time()
  config = demo_config()
  config.sampling.num_samples = args.signal_samples
  config.eval.num_prompts = args.signal_prompts
  path = os.path.join(args.workdir, f"signal_rollouts_{args.signal_prompts}x"
                      f"{args.signal_samples}.npz")
  os.makedirs(args.workdir, exist_ok=True)
  report = context_scores.analyse(
      config, path, sample_prompts=0 if os.path.exists(path) else args.signal_prompts,
      sample_seed=2024)
  rewards = np.asarray(context_scores.load_rollouts(path)[1]["rewards"])
  success = rewards.reshape(report["prompts"], -1) >= config.verifier.success_threshold
  mixed = success.any(1) & ~success.all(1)
  for v in report["variants"].values():
    # The mean per-token teacher log-prob of the successes and of the failures, over the
    # prompts with both: where a context moves each.
    scores = np.asarray(v.pop("scores"), np.float64)[mixed]
    v["mean_score_successes"] = float(scores[success[mixed]].mean())
    v["mean_score_failures"] = float(scores[~success[mixed]].mean())
  return {"prompts": report["prompts"], "samples_per_prompt": report["samples_per_prompt"],
          "success_rate": float((rewards >= 1.0).mean()), "variants": report["variants"],
          "wall_time_s": time.time() - start}


def _fmt(stat, digits=3) -> str:
  if stat is None or stat.get("mean") is None:
    return "n/a"
  text = f"{stat['mean']:.{digits}f}"
  if stat.get("ci95"):
    lo, hi = stat["ci95"]
    text += f" [{lo:.{digits}f}, {hi:.{digits}f}]"
  return text


def markdown(results: dict) -> str:
  """The tables of `results.json` as Markdown."""
  agg, setup = results["aggregates"], results["setup"]
  k = next((a["k"] for a in agg.values() if "k" in a), 4)
  lines = [
      "# Reproduction study on the demo task",
      "",
      f"Seeds {', '.join(map(str, setup['seeds']))} for "
      f"{', '.join(m for m in MAIN_METHODS if m in agg)}; seed(s) "
      f"{', '.join(map(str, setup.get('extra_seeds', setup['seeds'])))} for the others; "
      f"{setup['steps']} steps of {setup['prompts_per_step']} prompts x "
      f"{setup['rollouts_per_prompt']} rollouts (the same rollout budget for every method), "
      f"held-out evaluation on {setup['eval_prompts']} problems x {k} samples at "
      f"temperature 1. Mean over seeds, 95% t-interval in brackets. Total wall time "
      f"{results['wall_time_s'] / 60:.1f} min on {setup['machine']}.",
      "",
      f"| method | held-out success before | after | change | pass@{k} after | "
      "training reward, last sixth | wall time per run |",
      "|---|---|---|---|---|---|---|",
  ]
  for method in results["ordering"] + [m for m in agg if m not in results["ordering"]]:
    a = agg[method]
    if "success_after" not in a:
      lines.append(f"| {method} | failed (seeds {a['failed_seeds']}) | | | | | |")
      continue
    failed = f" ({len(a['failed_seeds'])} seed(s) failed)" if a["failed_seeds"] else ""
    lines.append(
        f"| {method}{failed} | {_fmt(a['success_before'])} | {_fmt(a['success_after'])} | "
        f"{_fmt(a['success_gain'])} | {_fmt(a[f'pass@{k}_after'])} | "
        f"{_fmt(a['train_reward_late'])} | {a['wall_time_s']['mean']:.0f} s |")
  lines += ["", "Ordering by held-out success after training: "
            + " > ".join(results["ordering"]) + "."]
  signal = results.get("teacher_signal_detail")
  if signal:
    lines += [
        "",
        "## Teacher signal: base-model teacher scores against verifier rewards",
        "",
        f"{signal['prompts']} held-out prompts x {signal['samples_per_prompt']} rollouts of "
        f"the base model (success rate {signal['success_rate']:.3f}); averages over the "
        "prompts with at least one success and one failure, prompt-level bootstrap 95% "
        "interval in brackets; the mean per-token log-prob the teacher gives the "
        "successes and the failures of those prompts.",
        "",
        "| context | prompts | AUC | pairwise accuracy | Spearman | Kendall tau-b | "
        "point-biserial | mean log-prob, successes / failures | teacher prompt tokens |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for variant, v in signal["variants"].items():
      cells = []
      for metric in ("auc", "pairwise_accuracy", "spearman", "kendall", "point_biserial"):
        lo, hi = v["ci95"][metric]
        cells.append(f"{v[metric]:.3f} [{lo:.3f}, {hi:.3f}]")
      means = (f"{v['mean_score_successes']:.3f} / {v['mean_score_failures']:.3f}"
               if "mean_score_successes" in v else "n/a")
      lines.append(f"| {variant} | {v['num_prompts']} | " + " | ".join(cells)
                   + f" | {means} | {v['mean_teacher_prompt_tokens']:.0f} |")
  return "\n".join(lines) + "\n"


def keep_other_sections(old: str, new: str) -> str:
  """`new` followed by the `## ` sections of `old` that `new` does not write (e.g. the
  base model's calibration from `benchmarks.base_calibration`), so a rerun of the study
  does not drop them."""
  def sections(text):
    parts = re.split(r"(?m)^(?=## )", text)
    return [(p.splitlines()[0].strip(), p) for p in parts[1:]]
  written = {heading for heading, _ in sections(new)}
  kept = [part.rstrip("\n") + "\n" for heading, part in sections(old)
          if heading not in written]
  return "\n".join([new.rstrip("\n") + "\n"] + kept)


def plots(results: dict, out: str) -> list[str]:
  """Training reward and held-out success against step, one line per method."""
  try:
    import matplotlib  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise SystemExit("Drawing the study's plots needs matplotlib: "
                     "pip install -e '.[plots]'") from e
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  written = []
  for key, name, ylabel in (("train_reward_curve", "train_reward.png", "training reward"),
                            ("heldout_curve", "heldout_success.png", "held-out success")):
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    for method, a in results["aggregates"].items():
      curve = a.get(key)
      if not curve:
        continue
      steps, values = zip(*curve)
      spread = seed_spread(results.get("runs", []), method, key)
      if key == "train_reward_curve" and len(values) >= 5:  # 5-step moving average
        values, spread = (_moving_average(values), [_moving_average(s) for s in spread]
                          if spread else None)
        steps = steps[4:]
      line, = ax.plot(steps, values, label=method,
                      marker="o" if key == "heldout_curve" else None)
      if spread:  # the seeds' range around their mean
        ax.fill_between(steps, spread[0], spread[1], color=line.get_color(), alpha=0.15,
                        linewidth=0)
    n = len(results["setup"]["seeds"])
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(f"{ylabel} (mean over {n} seed{'s' if n > 1 else ''}; "
                 "band: min-max over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = os.path.join(out, name)
    fig.savefig(path)
    plt.close(fig)
    written.append(path)
  return written


def main(argv=None):
  args = parse_args(argv)
  if args.plots_only:
    with open(os.path.join(args.out, "results.json"), encoding="utf-8") as f:
      print("\n".join(plots(json.load(f), args.out)))
    return
  start = time.time()
  demo = demo_config()
  os.makedirs(args.out, exist_ok=True)
  runs = [run_one(args, method, seed)
          for seed in sorted(set(args.seeds) | set(args.extra_seeds))
          for method in args.methods if seed in seeds_of(args, method)]
  aggregates = aggregate(runs)
  results = {
      "setup": {"methods": {m: METHODS[m] for m in args.methods}, "seeds": args.seeds,
                "extra_seeds": args.extra_seeds, "main_methods": list(MAIN_METHODS),
                "steps": args.steps, "eval_every": args.eval_every,
                "eval_prompts": args.eval_prompts,
                "prompts_per_step": demo.data.batch_size,
                "rollouts_per_prompt": demo.sampling.num_samples, "quick": args.quick,
                "machine": f"{os.cpu_count()}-core {os.uname().machine} CPU",
                "command": "python -m benchmarks.reproduce" + (" --quick" if args.quick
                                                               else "")},
      "runs": runs,
      "aggregates": aggregates,
      "ordering": ordering(aggregates),
      "methods": method_rows(aggregates),
  }
  results["teacher_signal_detail"] = teacher_signal_study(args)
  results["teacher_signal"] = teacher_signal_rows(results["teacher_signal_detail"])
  results["wall_time_s"] = time.time() - start
  with open(os.path.join(args.out, "results.json"), "w", encoding="utf-8") as f:
    json.dump(results, f, indent=1)
  md_path = os.path.join(args.out, "results.md")
  old = ""
  if os.path.exists(md_path):
    with open(md_path, encoding="utf-8") as f:
      old = f.read()
  with open(md_path, "w", encoding="utf-8") as f:
    f.write(keep_other_sections(old, markdown(results)))
  plots(results, args.out)
  print(json.dumps({"benchmark": "reproduce", "ordering": results["ordering"],
                    "wall_time_s": round(results["wall_time_s"], 1), "out": args.out}))


if __name__ == "__main__":
  main()
