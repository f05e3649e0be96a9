"""Tests for mopd_jax.demo_base's pretraining data (no model is trained here)."""

import numpy as np
import pytest
import jax.numpy as jnp

from mopd_jax import demo_base, peer_context, peer_selection, peer_template, tokenizers
from mopd_jax.data import demo_problems as dp
from mopd_jax.verifiers import callback


@pytest.fixture(scope="module")
def tok():
  proto = tokenizers.train_sentencepiece(demo_base.tokenizer_corpus(), 384)
  return tokenizers.SentencePieceTokenizer(proto)


def _rows(*responses, width=48):
  tokens = np.zeros((len(responses), width), np.int32)
  for r, ids in enumerate(responses):
    tokens[r, :len(ids)] = ids
  return jnp.asarray(tokens), jnp.asarray([len(ids) for ids in responses], jnp.int32)


def _run_prompt(tok, problem, *, primary=-1, another=-1, failure=-1, responses=(),
                feedback=None, summaries=None, instruction=False):
  """Row 0's teacher prompt as a run assembles it (peer_context), without padding."""
  ids, ins = tokenizers.encode_chat_prompt(tok, problem.prompt)
  pieces = peer_template.tokenize_pieces(tok)
  tokens, mask = jnp.asarray([ids], jnp.int32), jnp.ones((1, len(ids)), bool)
  ins = jnp.asarray([ins], jnp.int32)
  if instruction:
    tokens, mask, ins = peer_context.insert_piece(tokens, mask, ins,
                                                  pieces.summary_instruction, tok.pad_id)
  texts = [tok.encode(t) for t in responses] or [[3]]
  resp, lengths = _rows(*texts)
  selection = peer_selection.PeerSelection(
      primary=jnp.asarray([primary]), another=jnp.asarray([another]),
      failure=jnp.asarray([failure]), mask=jnp.asarray([True]))
  fb = None
  if feedback is not None:
    f_tokens, f_lengths = _rows(tok.encode(feedback), width=200)
    fb = peer_context.Feedback(f_tokens, f_lengths)
  sm = None
  if summaries is not None:
    s_tokens, s_lengths = _rows(*[tok.encode(text) for _, text in summaries], width=32)
    sm = peer_context.Summaries(s_tokens, s_lengths,
                                jnp.arange(len(summaries), dtype=jnp.int32)[None],
                                jnp.asarray([[good for good, _ in summaries]]))
  blocks = peer_context.PeerBlocks(resp, lengths, selection, feedback=fb, summaries=sm)
  out, out_mask = peer_context.assemble_teacher_prompts(
      tokens, mask, ins, blocks, pieces, peer_cap=48, pad_id=tok.pad_id,
      feedback_cap=200 if fb is not None else 0, summary_cap=32 if sm is not None else 0)
  return [int(t) for t, m in zip(out[0], out_mask[0]) if m]


def test_pretraining_prompts_are_the_runs_teacher_prompts(tok):
  enc = demo_base._Encoder(tok)  # pylint: disable=protected-access
  problem = dp.get_problem(int(dp.problem_ids("train")[0]))
  wrong = dp.misconceptions(problem)
  feedback = demo_base._feedback(problem, 1)  # pylint: disable=protected-access
  assert enc.prompt(problem.prompt) == tokenizers.encode_chat_prompt(tok, problem.prompt)[0]
  assert enc.prompt(problem.prompt, [("solution", problem.solution), ("another", wrong[0]),
                                     ("failure", wrong[1])]) == _run_prompt(
      tok, problem, primary=0, another=1, failure=2,
      responses=(problem.solution, wrong[0], wrong[1]))
  assert enc.prompt(problem.prompt, [("failure", wrong[0]), ("feedback", feedback)]) == (
      _run_prompt(tok, problem, failure=0, responses=(wrong[0],), feedback=feedback))
  summaries = [(True, "Return x."), (False, demo_base.summary_text(wrong[0]))]
  assert enc.prompt(problem.prompt, [("solution", problem.solution), ("failure", wrong[1])],
                    summaries, instruction=True) == _run_prompt(
      tok, problem, primary=0, failure=1, responses=(problem.solution, wrong[1]),
      summaries=summaries, instruction=True)


def test_summary_is_what_the_verifier_extracts():
  problem = dp.get_problem(3)
  text = f"{problem.solution}\n<summary>{demo_base.summary_text(problem.solution)}</summary>"
  summary, found = callback.extract_summary(text, 300)
  assert found and summary == demo_base.summary_text(problem.solution)
  assert summary.startswith("Return ") and summary.endswith(".")


def test_beliefs_are_distributions_with_confusable_wrong_answers():
  correct, top_wrong = [], []
  for i in dp.problem_ids("train")[:400]:
    problem = dp.get_problem(int(i))
    p = demo_base.beliefs(problem)
    assert p.shape == (1 + len(dp.misconceptions(problem)),)
    assert np.all(p > 0) and np.isclose(p.sum(), 1.0)
    correct.append(p[0])
    top_wrong.append(p[1:].max())
    skilled = demo_base.beliefs(problem, skill=0.5)
    assert np.isclose(skilled.sum(), 1.0) and skilled[0] > p[0]
  correct, top_wrong = np.array(correct), np.array(top_wrong)
  assert 0.3 <= correct.mean() <= 0.6
  # Often a wrong program is at least as likely as the right one.
  assert 0.3 <= np.mean(top_wrong >= correct) <= 0.8


def test_every_format_is_generated_and_scored_on_its_response(tok):
  enc = demo_base._Encoder(tok)  # pylint: disable=protected-access
  recipe = demo_base.BaseRecipe()
  rng = np.random.default_rng(0)
  problem = dp.get_problem(int(dp.problem_ids("train")[5]))
  for fmt in demo_base.FORMATS:
    for _ in range(5):
      prompt, response, first = demo_base._training_example(  # pylint: disable=protected-access
          enc, problem, recipe, rng, fmt)
      assert response[-1] == tok.eos_id and 0 <= first < len(response)
      assert prompt[:len(enc.prefix)] == enc.prefix and prompt[-len(enc.suffix):] == enc.suffix
      text = tok.decode(response[:-1])
      program = text.split("\n<summary>")[0]
      assert program in (problem.solution,) + dp.misconceptions(problem)
      assert ("<summary>" in text) == fmt.startswith("summaries")
  assert np.isclose(sum(demo_base.FORMATS.values()), 1.0)


def test_packer_keeps_examples_whole_and_separate():
  packer = demo_base._Packer(rows=3, length=16, pad_id=0)  # pylint: disable=protected-access
  examples = iter([([5, 6], [7, 8, 1], 0), ([9] * 10, [4, 1], 1), ([3] * 6, [2, 1], 0),
                   ([5] * 12, [6, 1], 0)] * 3)
  tokens, positions, segments, weights = packer.batch(lambda: next(examples))
  assert tokens[0, :5].tolist() == [5, 6, 7, 8, 1] and segments[0, :5].tolist() == [1] * 5
  assert positions[0, :5].tolist() == [0, 1, 2, 3, 4]
  # weights[t] marks that token t + 1 is a scored response token.
  assert weights[0, :5].tolist() == [0, 1, 1, 1, 0]
  assert tokens[0, 5:13].tolist() == [3] * 6 + [2, 1] and segments[0, 5] == 2
  assert weights[1, :12].tolist() == [0] * 10 + [1, 0]  # first response token not scored
  assert packer.pending is not None  # the example that did not fit opens the next batch
  assert (weights[segments == 0] == 0).all()


def test_external_demo_teacher_shares_the_tokenizer_and_loads(tiny_base_dir, tmp_path):
  import dataclasses  # pylint: disable=import-outside-toplevel
  import shutil  # pylint: disable=import-outside-toplevel
  from mopd_jax import settings, train_setup  # pylint: disable=import-outside-toplevel
  from tests.conftest import tiny_config  # pylint: disable=import-outside-toplevel
  base = tmp_path / "base"
  shutil.copytree(tiny_base_dir, base, ignore=shutil.ignore_patterns("data"))
  # A tiny stand-in for the teacher (same code path, two steps), built where
  # `ensure_teacher` looks, so that the run finds it instead of building the real one.
  recipe = dataclasses.replace(demo_base.TEACHER_RECIPE, steps=2, embed_dim=32, head_dim=8,
                               mlp_dim=64, rows=2)
  demo_base.ensure(demo_base.teacher_dir(str(base)), recipe, tokenizer_dir=str(base))
  assert (tmp_path / "base_teacher" / "tokenizer.model").read_bytes() == (
      base / "tokenizer.model").read_bytes()
  st = settings.from_config(tiny_config(str(base), **{
      "algorithm.name": "opd", "loss.alpha": 1.0, "teacher.mode": "external",
      "teacher.checkpoint": "demo", "teacher.param_dtype": "float32"}))
  student_cfg = demo_base.load(str(base))[0]
  teacher_cfg, params = train_setup._load_external_teacher(  # pylint: disable=protected-access
      st, None, student_cfg)
  assert teacher_cfg.num_layers == 4 and teacher_cfg.vocab_size == student_cfg.vocab_size
  assert params["layers"]["mlp"]["up_proj"]["kernel"].shape[0] == 4
