"""The study's bookkeeping: run records, seed aggregates, ordering, tables and plots.

The training runs themselves are the demo's (tested elsewhere); here synthetic run
directories stand in for them.
"""

import json
import os

import numpy as np
import pytest
from scipy import stats

from benchmarks import reproduce


def _write_run(directory, *, before, after, rewards, k=4):
  os.makedirs(directory, exist_ok=True)
  lines = [{"step": 0, "eval/success_rate": before, f"eval/pass@{k}": before + 0.1,
            "eval/pass@1": before}]
  for step, reward in enumerate(rewards, start=1):
    lines.append({"step": step, "train/reward_mean": reward, "train/loss": 0.1})
  lines.append({"step": len(rewards), "eval/success_rate": after,
                f"eval/pass@{k}": after + 0.1, "eval/pass@1": after})
  with open(os.path.join(directory, "metrics.jsonl"), "w", encoding="utf-8") as f:
    f.write("\n".join(json.dumps(line) for line in lines) + "\n")
  summary = {"eval_before": lines[0], "eval_after": lines[-1], "wall_time_s": 12.0,
             "step_time_median_s": 0.5, "compile_time_s": 3.0}
  with open(os.path.join(directory, "summary.json"), "w", encoding="utf-8") as f:
    json.dump(summary, f)


@pytest.fixture
def runs(tmp_path):
  out = []
  rng = np.random.default_rng(0)
  for method, base in (("mopd_2s1f", 0.6), ("grpo", 0.45), ("sft_verified", 0.5)):
    for seed in (0, 1, 2):
      d = str(tmp_path / method / f"seed{seed}")
      after = base + 0.03 * seed
      _write_run(d, before=0.4, after=after, rewards=list(rng.uniform(0, 1, 12)))
      out.append(reproduce.read_run(d, method, seed, {"seed": seed}))
  out.append({"method": "grpo", "seed": 3, "failed": "exit 1"})
  return out


def test_read_run_takes_curves_and_summary(runs):
  r = runs[0]
  assert r["k"] == 4 and len(r["train_reward"]) == 12
  assert [e["step"] for e in r["heldout"]] == [0, 12]
  assert r["success_after"] == pytest.approx(0.6) and r["pass_after"] == pytest.approx(0.7)


def test_mean_ci_is_the_t_interval():
  values = [0.61, 0.55, 0.7]
  got = reproduce.mean_ci(values)
  lo, hi = stats.t.interval(0.95, len(values) - 1, loc=np.mean(values),
                            scale=stats.sem(values))
  np.testing.assert_allclose(got["ci95"], [lo, hi], rtol=1e-3)
  assert reproduce.mean_ci([0.5]) == {"mean": 0.5, "ci95": None, "n": 1}


def test_aggregate_ordering_and_failed_seeds_are_reported(runs):
  agg = reproduce.aggregate(runs)
  assert reproduce.ordering(agg) == ["mopd_2s1f", "sft_verified", "grpo"]
  assert agg["grpo"]["failed_seeds"] == [3] and agg["grpo"]["seeds"] == [0, 1, 2]
  np.testing.assert_allclose(agg["mopd_2s1f"]["success_after"]["mean"], 0.63)
  np.testing.assert_allclose(agg["mopd_2s1f"]["success_gain"]["mean"], 0.23)
  # The late training reward is the mean of the last sixth of the steps (2 of 12).
  late = np.mean([np.mean([v for _, v in r["train_reward"]][-2:]) for r in runs[:3]])
  np.testing.assert_allclose(agg["mopd_2s1f"]["train_reward_late"]["mean"], late)
  assert [s for s, _ in agg["grpo"]["heldout_curve"]] == [0, 12]


def test_seed_spread_is_the_range_over_seeds(runs):
  lows, highs = reproduce.seed_spread(runs, "mopd_2s1f", "heldout_curve")
  # Held-out success at steps 0 and 12 of seeds 0, 1, 2: before 0.4 each, after 0.6 + 0.03 s.
  np.testing.assert_allclose(lows, [0.4, 0.6])
  np.testing.assert_allclose(highs, [0.4, 0.66])
  rewards = np.asarray([[v for _, v in r["train_reward"]] for r in runs[:3]])
  lows, highs = reproduce.seed_spread(runs, "mopd_2s1f", "train_reward_curve")
  np.testing.assert_allclose(lows, rewards.min(axis=0))
  np.testing.assert_allclose(highs, rewards.max(axis=0))
  one_seed = [r for r in runs if r["method"] != "grpo" or r.get("seed") == 0]
  assert reproduce.seed_spread(one_seed, "grpo", "heldout_curve") is None


def test_markdown_and_plots_are_written(runs, tmp_path):
  agg = reproduce.aggregate(runs)
  signal = {"prompts": 4, "samples_per_prompt": 8, "success_rate": 0.4, "variants": {
      "base": {"auc": 0.5, "pairwise_accuracy": 0.5, "spearman": 0.0, "kendall": 0.0,
               "point_biserial": 0.0, "num_prompts": 3, "mean_teacher_prompt_tokens": 40.0,
               "mean_score_successes": -0.25, "mean_score_failures": -1.5,
               "ci95": {m: (0.1, 0.9) for m in ("auc", "pairwise_accuracy", "spearman",
                                                "kendall", "point_biserial")}}}}
  results = {"setup": {"seeds": [0, 1, 2], "steps": 12, "prompts_per_step": 16,
                       "rollouts_per_prompt": 4, "eval_prompts": 96, "machine": "test"},
             "aggregates": agg, "ordering": reproduce.ordering(agg),
             "teacher_signal_detail": signal, "wall_time_s": 120.0, "runs": runs}
  text = reproduce.markdown(results)
  assert "| mopd_2s1f | 0.400 [0.400, 0.400] | 0.630 [" in text
  assert "mopd_2s1f > sft_verified > grpo" in text
  assert "| base | 3 | 0.500 [0.100, 0.900]" in text
  assert "| -0.250 / -1.500 | 40 |" in text
  written = reproduce.plots(results, str(tmp_path))
  for path in written:
    with open(path, "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  # --plots-only draws the same plots again from a results.json, running nothing.
  redraw = tmp_path / "redraw"
  redraw.mkdir()
  (redraw / "results.json").write_text(json.dumps(results))
  reproduce.main(["--plots-only", f"--out={redraw}"])
  assert sorted(p.name for p in redraw.glob("*.png")) == ["heldout_success.png",
                                                          "train_reward.png"]


def test_a_rerun_keeps_the_sections_it_does_not_write():
  old = ("# Reproduction study\n\nold table\n\n## Teacher signal: x\n\nold signal\n\n"
         "## Demo base model v5: calibration\n\ncalibration table\n")
  new = "# Reproduction study\n\nnew table\n\n## Teacher signal: x\n\nnew signal\n"
  text = reproduce.keep_other_sections(old, new)
  assert text.startswith(new)
  assert "old signal" not in text and "old table" not in text
  assert text.endswith("## Demo base model v5: calibration\n\ncalibration table\n")
  assert reproduce.keep_other_sections("", new) == new


def test_results_json_summaries_have_the_documented_schema(runs):
  agg = reproduce.aggregate(runs)
  rows = reproduce.method_rows(agg)
  assert [r["method"] for r in rows] == ["mopd_2s1f", "grpo", "sft_verified"]
  mopd = rows[0]
  assert set(mopd) == {"method", "seeds", "heldout_success_mean", "heldout_success_ci",
                       "pass_at_k"}
  assert mopd["seeds"] == [0, 1, 2]
  np.testing.assert_allclose(mopd["heldout_success_mean"], np.mean([0.6, 0.63, 0.66]))
  assert mopd["heldout_success_ci"] == agg["mopd_2s1f"]["success_after"]["ci95"]
  assert mopd["pass_at_k"]["k"] == 4
  np.testing.assert_allclose(mopd["pass_at_k"]["mean"], np.mean([0.7, 0.73, 0.76]))
  signal = {"variants": {"base": {"auc": 0.61, "num_prompts": 9,
                                  "ci95": {"auc": [0.5, 0.7]}},
                         "2S1F": {"auc": 0.8, "num_prompts": 9,
                                  "ci95": {"auc": [0.7, 0.9]}}}}
  assert reproduce.teacher_signal_rows(signal) == [
      {"context": "base", "auc": 0.61, "auc_ci": [0.5, 0.7], "num_prompts": 9},
      {"context": "2S1F", "auc": 0.8, "auc_ci": [0.7, 0.9], "num_prompts": 9}]


def test_main_methods_run_every_seed_the_others_the_extra_seeds():
  args = reproduce.parse_args(["--seeds=0,1,2", "--extra-seeds=5"])
  assert set(reproduce.MAIN_METHODS) <= set(reproduce.METHODS)
  assert reproduce.seeds_of(args, "mopd_2s1f") == [0, 1, 2]
  assert reproduce.seeds_of(args, "sdpo_feedback") == [0, 1, 2]
  assert reproduce.seeds_of(args, "mopd_1s") == [5]
  with pytest.raises(SystemExit):
    reproduce.parse_args(["--extra-seeds=a"])


def test_every_method_is_a_valid_run_config():
  """Each method's overrides on the demo config pass the settings' checks."""
  from mopd_jax import settings  # pylint: disable=import-outside-toplevel
  from tests.conftest import load_config  # pylint: disable=import-outside-toplevel
  for method, overrides in reproduce.METHODS.items():
    st = settings.from_config(load_config(**overrides))
    assert st.algorithm.name == overrides["algorithm.name"], method


def test_bad_arguments_name_the_flag():
  with pytest.raises(SystemExit):
    reproduce.parse_args(["--methods=mopd_2s1f,ppo"])
  args = reproduce.parse_args(["--quick"])
  assert args.seeds == [0] and args.steps == 8 and args.out.startswith(args.workdir)
  full = reproduce.parse_args([])
  assert full.seeds == [0, 1, 2] and full.out.endswith(os.path.join("benchmarks",
                                                                     "reproduction"))
