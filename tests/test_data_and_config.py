"""Data layer (seqio task, TF-free cache, deterministic order), tokenizer and config checks."""

import os
import subprocess
import sys

import numpy as np
import pytest

from mopd_jax import settings, tokenizers
from mopd_jax.data import cache, demo_problems, pipeline
from tests.conftest import load_config


@pytest.fixture(scope="module")
def tok(tiny_base_dir):
  return tokenizers.SentencePieceTokenizer.from_file(
      os.path.join(tiny_base_dir, "tokenizer.model"))


@pytest.fixture(scope="module")
def heldout(tiny_base_dir, tok, tmp_path_factory):
  directory = str(tmp_path_factory.mktemp("data"))
  split = pipeline.load_split(directory, "heldout", os.path.join(tiny_base_dir,
                                                                 "tokenizer.model"), tok)
  return directory, split


def test_tokenizer_round_trip_and_special_ids(tok):
  assert (tok.pad_id, tok.eos_id, tok._sp.unk_id()) == (0, 1, 2)
  for i in (0, 17, 2000):
    p = demo_problems.get_problem(i)
    for text in (p.prompt, p.solution):
      assert tok.decode(tok.encode(text)) == text
  ids, insert = tokenizers.encode_chat_prompt(tok, "hello")
  assert tok.decode(ids) == tokenizers.ChatFormat().render("hello")
  assert tok.decode(ids[:insert]) == tokenizers.ChatFormat().prefix + "hello"


def test_sentencepiece_training_is_reproducible():
  texts = [demo_problems.get_problem(i).solution for i in range(300)]
  assert tokenizers.train_sentencepiece(texts, 120) == tokenizers.train_sentencepiece(texts,
                                                                                      120)


def test_seqio_cache_matches_direct_tokenization(heldout, tok):
  directory, split = heldout
  ids = demo_problems.problem_ids("heldout")
  np.testing.assert_array_equal(split.example_id, ids)
  for row in (0, 5, len(ids) - 1):
    p = demo_problems.get_problem(int(ids[row]))
    expected, insert = tokenizers.encode_chat_prompt(tok, p.prompt)
    np.testing.assert_array_equal(split.prompts[row], expected)
    assert split.insert_index[row] == insert
    assert split.reference_table()[int(ids[row])] == p.tests


def test_cache_reads_without_tensorflow(heldout):
  directory, split = heldout
  code = ("import sys; sys.modules['tensorflow'] = None\n"
          "from mopd_jax.data import cache\n"
          f"s = cache.read({os.path.join(directory, 'heldout.npz')!r})\n"
          "print(len(s), int(s.prompts[3].sum()))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       check=True, cwd=os.path.dirname(os.path.dirname(__file__)))
  assert out.stdout.split() == [str(len(split)), str(int(split.prompts[3].sum()))]


def test_batches_depend_only_on_seed_and_step(heldout):
  _, split = heldout
  make = lambda seed: pipeline.PromptBatches(split, batch_size=24, max_prompt_len=64,  # noqa
                                             seed=seed, pad_id=0)
  a, b = make(3), make(3)
  # Out of order and repeated access give the same batches.
  for step in (7, 0, 13, 7):
    for key in ("prompt_tokens", "prompt_mask", "insert_index", "example_id"):
      np.testing.assert_array_equal(a.batch(step)[key], b.batch(step)[key])
  assert not np.array_equal(a.batch(0)["example_id"], make(4).batch(0)["example_id"])
  # One epoch covers every row exactly once.
  n = len(split)
  seen = np.concatenate([a.indices(s) for s in range(n // 24)])
  assert len(set(seen.tolist())) == len(seen)
  batch = a.batch(1)
  lengths = batch["prompt_mask"].sum(1)
  for row in range(24):  # left padding: real tokens are contiguous at the right end
    assert batch["prompt_mask"][row, 64 - lengths[row]:].all()
    assert (batch["prompt_tokens"][row, :64 - lengths[row]] == 0).all()


def test_too_long_prompts_are_reported_and_counted(heldout, caplog):
  _, split = heldout
  lengths = np.array([len(p) for p in split.prompts])
  limit = int(np.median(lengths))
  batches = pipeline.PromptBatches(split, batch_size=4, max_prompt_len=limit, seed=0,
                                   pad_id=0)
  assert batches.report["too_long"] == int((lengths > limit).sum()) > 0
  assert "exceeds max_prompt_len" in caplog.text
  assert all(len(split.prompts[i]) <= limit for i in batches.indices(0))
  with pytest.raises(ValueError, match="fewer than batch_size"):
    pipeline.PromptBatches(split, batch_size=10_000, max_prompt_len=limit, seed=0, pad_id=0)


def test_cache_round_trip(tmp_path):
  split = cache.TokenizedSplit(example_id=np.array([4, 9]),
                               prompts=[np.array([5, 6, 7], np.int32),
                                        np.array([8], np.int32)],
                               insert_index=np.array([2, 0]), references=['{"a": 1}', "[]"],
                               meta={"vocab_size": 11})
  path = str(tmp_path / "x.npz")
  cache.write(path, split)
  back = cache.read(path)
  assert [p.tolist() for p in back.prompts] == [[5, 6, 7], [8]]
  assert back.references == split.references and back.meta == split.meta
  with pytest.raises(FileNotFoundError, match="does not exist"):
    cache.read(str(tmp_path / "missing.npz"))


@pytest.mark.parametrize("key,value,match", [
    ("loss.alpha", 1.5, r"config\.loss\.alpha = 1\.5.*\[0, 1\]"),
    ("loss.aggregation", "mean", "config.loss.aggregation = 'mean'.*token-mean"),
    ("peers.failure_condition", "sometimes", "failure_condition.*when_no_solution"),
    ("teacher.mode", "average", "config.teacher.mode = 'average'.*ema"),
    ("sampling.top_p", 0.0, r"sampling\.top_p = 0\.0.*\(0, 1\]"),
    ("data.batch_size", 0, "data.batch_size = 0.*positive"),
    ("mesh.shape", (2, 2), "mesh.shape"),
    ("loss.top_k", 0, "loss.top_k = 0.*None"),
])
def test_invalid_config_names_key_and_allowed_values(key, value, match):
  with pytest.raises(settings.ConfigError, match=match):
    settings.from_config(load_config(**{key: value}))


def test_non_full_logit_requires_reverse_kl():
  with pytest.raises(settings.ConfigError, match="alpha must be 1.0"):
    settings.from_config(load_config(**{"loss.full_logit": False}))
  settings.from_config(load_config(**{"loss.full_logit": False, "loss.alpha": 1.0}))


def test_default_config_is_valid_and_unknown_preset_fails():
  settings.from_config(load_config())
  with pytest.raises(ValueError, match="Unknown preset 'nope'"):
    load_config(arg="nope")


@pytest.mark.parametrize("preset", ["qwen3_4b", "qwen3_4b_teacher_qwen3_14b"])
def test_paper_scale_presets_require_checkpoints(preset):
  with pytest.raises(settings.ConfigError, match="--config.model.checkpoint=PATH"):
    settings.from_config(load_config(arg=preset))
  config = load_config(arg=preset, **{"model.checkpoint": "/ckpt/student"})
  if preset.endswith("14b"):
    with pytest.raises(settings.ConfigError, match="--config.teacher.checkpoint"):
      settings.from_config(config)
  else:
    settings.from_config(config)


def test_importing_settings_imports_no_jax():
  """settings reads its allowed values from mopd_jax.choices, not from the implementations
  (the algorithms load, with JAX, when a Settings is built)."""
  code = ("import sys\n"
          "from mopd_jax import settings\n"
          "settings.base_config()\n"
          "heavy = ('jax', 'flax', 'optax', 'tensorflow', 'mopd_jax.losses', "
          "'mopd_jax.sampling', 'mopd_jax.teacher', 'mopd_jax.models.transformer', "
          "'mopd_jax.models.attention', 'mopd_jax.data.sources')\n"
          "print(sorted(m for m in heavy if m in sys.modules))\n")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       check=True, cwd=os.path.dirname(os.path.dirname(__file__)))
  assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_allowed_values_are_those_the_implementations_accept():
  from mopd_jax import choices  # pylint: disable=import-outside-toplevel
  from mopd_jax.data import sources  # pylint: disable=import-outside-toplevel
  from mopd_jax.models import attention, transformer  # pylint: disable=import-outside-toplevel
  assert tuple(transformer.REMAT_POLICIES) == choices.REMAT_POLICIES
  assert tuple(attention.PRECISIONS) == choices.MATMUL_PRECISIONS
  assert tuple(sources._READERS) == choices.SOURCE_KINDS  # pylint: disable=protected-access


def test_micro_batch_rows_must_divide_the_rows():
  with pytest.raises(settings.ConfigError,
                     match=r"micro_batch_rows = 5: it must divide the 64 rows.*\[1, 2, 4"):
    settings.from_config(load_config(**{"optim.micro_batch_rows": 5}))


@pytest.mark.parametrize("name", ["math", "science", "tooluse"])
def test_domain_configs_share_one_block(name):
  local = settings.from_config(load_config(name))
  assert (local.data.task, local.model.checkpoint, local.run.total_steps) == (
      {"math": "math", "science": "science", "tooluse": "tooluse"}[name], "demo", 3)
  assert os.path.exists(local.data.path)
  config = load_config(name, "qwen3_8b")
  assert config.model.preset == "qwen3-8b" and config.data.batch_size == 32
  with pytest.raises(settings.ConfigError, match="--config.model.checkpoint=PATH"):
    settings.from_config(config)
