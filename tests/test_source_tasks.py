"""Real-data tasks: seqio tasks and the TFDS builder over the native fixtures, the tokenised
cache they feed (read without TensorFlow), over-length prompts, and the data settings."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from mopd_jax import settings, tokenizers, train_setup
from mopd_jax.data import cache, pipeline, source_splits, sources
from mopd_jax.verifiers import choice, tooluse
from tests.conftest import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "tests", "data")


class CharTokenizer:
  """One token per character (ids 3..258), enough to check rendering and offsets."""

  vocab_size = 259

  def encode(self, text):
    return [3 + (ord(c) % 256) for c in text]

  def decode(self, ids):
    return "".join(chr(i - 3) for i in ids)


def lcb_data(**overrides):
  values = {"task": "code", "source": "livecodebench",
            "path": os.path.join(DATA, "livecodebench"), "options": '{"split": "train"}',
            "eval_options": '{"split": "test"}', **overrides}
  return settings.DataSettings(**values)


def test_seqio_task_serves_the_sources_in_order_with_reports():
  from mopd_jax.data import seqio_tasks  # pylint: disable=import-outside-toplevel
  task = seqio_tasks.register_source_task("code", source_splits.split_specs(lcb_data()))
  assert task.name == "mopd_code"
  expected = {split: sources.load("livecodebench", os.path.join(DATA, "livecodebench"),
                                  split=name)
              for split, name in (("train", "train"), ("heldout", "test"))}
  for split, problems in expected.items():
    rows = seqio_tasks.text_examples(task.get_dataset(sequence_length=None, split=split,
                                                      shuffle=False, num_epochs=1))
    offset = source_splits.HELDOUT_ID_OFFSET if split == "heldout" else 0
    assert [r["example_id"] for r in rows] == [offset + i for i in range(len(problems))]
    assert [r["problem_id"] for r in rows] == [p.id for p in problems]
    assert [r["inputs"] for r in rows] == [p.prompt for p in problems]
    assert [json.loads(r["reference"]) for r in rows] == [p.reference for p in problems]
  reports = seqio_tasks.source_reports(task)
  assert reports["train"]["bad_rows"] == 7 and reports["heldout"]["problems"] == 3


def test_task_keeps_only_its_domain_and_counts_the_rest_as_filtered():
  spec = source_splits.SplitSpec.make("mopd_parquet", os.path.join(DATA, "mopd_parquet"))
  problems, report = source_splits.load_split_problems("math", spec)
  assert [p.id for p in problems] == ["toy_math/0"]
  assert report["problems"] == 1 and report["filtered"] == 3 and report["bad_rows"] == 2
  with pytest.raises(ValueError, match="No code problem for task 'code'"):
    source_splits.load_split_problems(
        "code", source_splits.SplitSpec.make("aime", os.path.join(DATA, "aime")))


def test_tfds_builder_over_the_manual_dir_feeds_the_cache(tmp_path):
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  from mopd_jax.data import tfds_problems  # pylint: disable=import-outside-toplevel
  builder = tfds_problems.MopdProblems(config="livecodebench", data_dir=str(tmp_path))
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir=os.path.join(DATA, "livecodebench")))
  assert builder.info.metadata["test"] == {"rows": 10, "problems": 3, "bad_rows": 7,
                                           "filtered": 0}
  expected = {p.id: p for p in sources.load("livecodebench",
                                            os.path.join(DATA, "livecodebench"),
                                            split="test")}
  rows = list(builder.as_dataset(split="test", shuffle_files=False).as_numpy_iterator())
  assert {r["id"].decode(): json.loads(r["reference"]) for r in rows} == {
      k: p.reference for k, p in expected.items()}
  split = tfds_problems.cache_split(builder.as_dataset(split="test", shuffle_files=False),
                                    "heldout", CharTokenizer(), task="code",
                                    load_report=builder.info.metadata["test"])
  assert split.meta["load"]["bad_rows"] == 7 and split.meta["domain"] == "code"
  assert sorted(split.example_id) == [source_splits.HELDOUT_ID_OFFSET + i for i in range(3)]
  tok = CharTokenizer()
  for prompt, insert, ref in zip(split.prompts, split.insert_index, split.references):
    text = tok.decode(prompt[:insert])
    problem = next(p for p in expected.values() if text.endswith(p.prompt))
    assert json.loads(ref) == problem.reference


def test_source_cache_is_built_once_and_read_without_tensorflow(tmp_path, monkeypatch):
  data = lcb_data()
  splits = pipeline.load_source_splits(str(tmp_path), data, CharTokenizer())
  files = sorted(os.listdir(tmp_path))
  assert len(files) == 2 and files[0].startswith("mopd_code_heldout_")
  assert splits["train"].meta["load"] == {"rows": 10, "problems": 3, "bad_rows": 7,
                                          "filtered": 0}
  train_problems = sources.load("livecodebench", data.path, split="train")
  tok = CharTokenizer()
  for i, problem in enumerate(train_problems):
    ids, insert = splits["train"].prompts[i], splits["train"].insert_index[i]
    assert tok.decode(ids[:insert]).endswith(problem.prompt)
    assert splits["train"].reference_table()[i] == problem.reference
  # Once built, the cache is read back without the seqio task (and TensorFlow).
  monkeypatch.setitem(sys.modules, "mopd_jax.data.seqio_tasks", None)
  again = pipeline.load_source_splits(str(tmp_path), data, CharTokenizer())
  np.testing.assert_array_equal(again["heldout"].example_id, splits["heldout"].example_id)
  script = ("import sys; sys.modules['tensorflow'] = None; sys.modules['seqio'] = None\n"
            "from mopd_jax.data import cache\n"
            f"s = cache.read({os.path.join(str(tmp_path), files[1])!r})\n"
            "print(len(s), s.meta['load']['problems'])")
  out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                       check=True, cwd=ROOT)
  assert out.stdout.split() == ["3", "3"]


def test_changed_options_build_another_cache(tmp_path):
  pipeline.load_source_splits(str(tmp_path), lcb_data(), CharTokenizer())
  pipeline.load_source_splits(str(tmp_path), lcb_data(options='{"release": "v6"}'),
                              CharTokenizer())
  names = sorted(os.listdir(tmp_path))
  assert len([n for n in names if n.startswith("mopd_code_train_")]) == 2
  assert len([n for n in names if n.startswith("mopd_code_heldout_")]) == 1


def _split(prompts, inserts):
  return cache.TokenizedSplit(example_id=np.arange(len(prompts)),
                              prompts=[np.asarray(p, np.int32) for p in prompts],
                              insert_index=np.asarray(inserts, np.int32),
                              references=["{}"] * len(prompts), meta={})


def test_overlong_prompts_are_filtered_or_truncated_and_counted():
  # Prompt = text before the insertion index + 2 tokens of end of turn / generation prompt.
  prompts = [list(range(10, 16)) + [1, 2], list(range(20, 40)) + [1, 2], [5, 6, 7] + [1] * 9]
  inserts = [6, 20, 3]
  filtered = pipeline.PromptBatches(_split(prompts, inserts), batch_size=1, max_prompt_len=8,
                                    seed=0, pad_id=0)
  assert filtered.report == {"rows": 3, "too_long": 2, "truncated": 0}
  assert filtered.first(1)["example_id"].tolist() == [0]
  cut = pipeline.PromptBatches(_split(prompts, inserts), batch_size=2, max_prompt_len=8,
                               seed=0, pad_id=0, overlong="truncate")
  # The third prompt's tail alone (9 tokens) does not fit: filtered even when truncating.
  assert cut.report == {"rows": 3, "too_long": 1, "truncated": 1}
  batch = cut.first(2)
  np.testing.assert_array_equal(batch["prompt_tokens"][1], [20, 21, 22, 37, 38, 39, 1, 2])
  assert batch["insert_index"].tolist() == [6, 6]
  assert batch["prompt_mask"].all()
  with pytest.raises(ValueError, match="overlong must be"):
    pipeline.PromptBatches(_split(prompts, inserts), batch_size=1, max_prompt_len=8, seed=0,
                           pad_id=0, overlong="drop")


def test_data_settings_name_the_offending_key():
  with pytest.raises(settings.ConfigError, match=r"config.data.source = 'aime' with "
                     r"config.data.task = 'demo_code'"):
    settings.DataSettings(source="aime")
  with pytest.raises(settings.ConfigError, match="config.data.path is required"):
    settings.DataSettings(task="math", source="deepmath")
  with pytest.raises(settings.ConfigError, match="config.data.source = 'gsm8k'"):
    settings.DataSettings(task="math", source="gsm8k", path="x")
  with pytest.raises(settings.ConfigError, match="config.data.options = 'split=train'"):
    settings.DataSettings(task="code", source="livecodebench", path="x",
                          options="split=train")
  with pytest.raises(settings.ConfigError, match="config.data.overlong = 'cut'"):
    settings.DataSettings(overlong="cut")
  specs = source_splits.split_specs(lcb_data(eval_source="humaneval", eval_path="wheels"))
  assert specs["train"] == source_splits.SplitSpec("livecodebench", lcb_data().path,
                                                   (("split", "train"),))
  assert specs["heldout"] == source_splits.SplitSpec("humaneval", "wheels", (("split", "test"),))


def test_domain_score_batch_uses_the_domains_verifier():
  vs = settings.VerifierSettings(max_workers=1)
  assert train_setup.domain_score_batch("choice", vs) is choice.score_batch
  assert train_setup.domain_score_batch("tooluse", vs) is tooluse.score_batch
  results = train_setup.domain_score_batch("math", vs)([r"\boxed{2}", r"\boxed{3}"],
                                                       [{"answer": "2"}, {"answer": "2"}])
  assert [r.reward for r in results] == [1.0, 0.0]
  ref = {"fn_name": "f", "inputs": [[1]], "outputs": [2]}
  results = train_setup.domain_score_batch("code", vs)(
      ["```python\ndef f(x):\n    return 2 * x\n```"], [ref])
  assert [r.reward for r in results] == [1.0]


@pytest.mark.parametrize("name, arg, task", [
    ("math", "qwen3_4b", "math"), ("math", "qwen3_8b", "math"),
    ("science", "qwen3_8b", "science"), ("tooluse", "qwen3_8b", "tooluse"),
    ("code", "lcb", "code")])
def test_paper_presets_need_checkpoint_and_data_and_have_the_papers_settings(name, arg, task):
  config = load_config(name, arg)
  with pytest.raises(settings.ConfigError, match="config.model.checkpoint is required"):
    settings.from_config(config)
  config.model.checkpoint = "/ckpt/model"
  with pytest.raises(settings.ConfigError, match="config.data.path is required"):
    settings.from_config(config)
  config.data.path = "/data/train"
  st = settings.from_config(config)
  assert st.data.task == task and st.data.batch_size == 32 and st.data.max_prompt_len == 2048
  assert (st.sampling.num_samples, st.sampling.max_response_len) == (8, 4096)
  assert (st.optim.lr, st.optim.warmup_steps, st.teacher.ema_rate) == (1e-5, 10, 0.05)
  assert (st.eval.num_samples, st.eval.temperature, st.eval.top_p) == (8, 0.6, 0.95)
  assert (st.loss.alpha, st.loss.top_k, st.model.dtype) == (0.5, 100, "bfloat16")
  assert (st.peers.include_another, st.peers.include_failure) == (True, True)
  assert st.run.eval_every == 5 and st.run.checkpoint_every == 50


@pytest.mark.parametrize("name", ["math", "science", "tooluse"])
def test_local_presets_point_at_the_fixtures(name):
  st = settings.from_config(load_config(name))
  assert st.model.checkpoint == "demo"
  for spec in source_splits.split_specs(st.data).values():
    assert os.path.exists(spec.path) and os.path.commonpath([spec.path, DATA]) == DATA


def test_system_prompt_of_a_row_reaches_the_cached_prompt(tmp_path):
  data = settings.DataSettings(task="science", source="mopd_parquet",
                               path=os.path.join(DATA, "mopd_parquet"))
  split = pipeline.load_source_splits(str(tmp_path), data, CharTokenizer())["train"]
  tok = CharTokenizer()
  text = tok.decode(split.prompts[0][:split.insert_index[0]])
  assert text == tokenizers.ChatFormat().prefix + (
      "You are a chemist.\n\nPick the noble gas: A. Neon B. Iron. Answer in <answer></answer>.")
  assert split.reference_table() == {0: "A"}
