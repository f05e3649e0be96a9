"""Summaries variant: host extraction, member selection, prompt assembly, one jitted step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mopd_jax import (evaluation, peer_context, peer_template, settings, step_teacher, train,
                      train_step)
from mopd_jax.peer_context import PeerSelection
from mopd_jax.peer_template import TemplatePieces
from mopd_jax.verifiers import callback
from mopd_jax.verifiers.result import Result
from tests.conftest import tiny_config

# ---------------------------------------------------------------- Host extraction.


@pytest.mark.parametrize("text, expected", [
    ("work... <summary> Use a stack. </summary>", ("Use a stack.", True)),
    # The first complete summary, as the authors take it.
    ("<summary>first</summary> more <summary>second</summary> tail", ("first", True)),
    ("<summary>a</summary> then <summary>b", ("a", True)),
    ("<summary>x <summary>y</summary> z", ("x <summary>y", True)),
    ("<summary>\ntwo\nlines\n</summary>", ("two\nlines", True)),
    # No complete summary: the first characters of the response.
    ("answer <summary>  cut off here", ("answer <su", False)),
    ("no tag at all, just a long answer", ("no tag at ", False)),
    ("short", ("short", False)),
    ("</summary> closing only", ("</summary>", False)),
])
def test_extract_summary(text, expected):
  assert callback.extract_summary(text, 10) == expected


class _CharTokenizer:
  """One token per character (its code point); decode inverts it."""

  def encode(self, text):
    return [ord(c) for c in text]

  def decode(self, ids):
    return "".join(chr(int(i)) for i in ids)


def test_host_summarize_pads_caps_and_counts_missing():
  tok = _CharTokenizer()
  host = callback.HostVerifier(lambda t, r: [], {}, tok, feedback_len=1, summary_len=6,
                               summary_fallback_chars=4)
  texts = ["x <summary>ab</summary>", "plain answer", "<summary>a long summary</summary>"]
  width = max(map(len, texts)) + 3
  tokens = np.zeros((3, width), np.int32)
  for row, text in enumerate(texts):
    tokens[row, :len(text)] = tok.encode(text)
  lengths = np.array([len(t) for t in texts], np.int32)
  summaries, summary_lengths, missing = host.summarize(tokens, lengths)
  expected = ["ab", "plai", "a long"]
  assert summaries.shape == (3, 6) and summaries.dtype == np.int32
  np.testing.assert_array_equal(summary_lengths, [2, 4, 6])
  np.testing.assert_array_equal(missing, [0, 1, 0])
  for row, text in enumerate(expected):
    np.testing.assert_array_equal(summaries[row, :len(text)], tok.encode(text))
    assert not summaries[row, len(text):].any()


# ---------------------------------------------------------------- Member selection.


def _candidates(group, i, primary):
  """Members whose summary rollout i may read: not itself, not its shown primary."""
  return [j for j in range(group) if j != i and j != primary]


@pytest.mark.parametrize("k", [1, 3, 7])
def test_select_summary_members_draws_valid_members(k):
  rng = np.random.default_rng(k)
  for trial in range(5):
    success = rng.random((3, 6)) < 0.5
    primary = np.asarray(peer_context.select_peers(jnp.asarray(success),
                                                   jax.random.PRNGKey(0)).primary)
    members, labels = peer_context.select_summary_members(
        jnp.asarray(success), jnp.asarray(primary), k, jax.random.PRNGKey(trial))
    members, labels = np.asarray(members), np.asarray(labels)
    assert members.shape == labels.shape == (3, 6, k)
    for b in range(3):
      for i in range(6):
        allowed = _candidates(6, i, primary[b, i])
        shown = [j for j in members[b, i] if j >= 0]
        count = min(k, len(allowed))
        # Distinct allowed members fill the first slots; the rest are empty.
        assert len(set(shown)) == len(shown) == count and set(shown) <= set(allowed)
        assert (members[b, i, count:] == -1).all()
        np.testing.assert_array_equal(labels[b, i, :count], success[b, shown])
        assert not labels[b, i, count:].any()


def test_summary_members_are_a_uniform_ordered_sample():
  # Rollout 0 of G = 5 with primary 1 reads 2 of the candidates {2, 3, 4}: each of the
  # 6 ordered pairs has probability 1/6, and every (b, i) draws independently.
  batch, group = 6000, 5
  success = jnp.asarray(np.tile([False, True, False, True, False], (batch, 1)))
  primary = jnp.asarray(np.tile([1, 3, 1, 1, 1], (batch, 1)), jnp.int32)
  members, _ = jax.jit(peer_context.select_summary_members, static_argnums=2)(
      success, primary, 2, jax.random.PRNGKey(3))
  members = np.asarray(members)
  pairs = members[:, 0, 0] * group + members[:, 0, 1]
  counts = np.bincount(pairs, minlength=group * group)
  expected = [a * group + b for a in (2, 3, 4) for b in (2, 3, 4) if a != b]
  assert counts[expected].sum() == batch
  sigma = np.sqrt(batch * (1 / 6) * (5 / 6))
  assert np.all(np.abs(counts[expected] - batch / 6) < 5 * sigma), counts[expected]
  # Rollouts 0 and 2 (candidates {2, 3, 4} and {0, 3, 4}) draw independently: their first
  # picks agree with probability 2 / 9.
  same = np.mean(members[:, 0, 0] == members[:, 2, 0])
  assert abs(same - 2 / 9) < 5 * np.sqrt(2 / 9 * 7 / 9 / batch)
  other_key = peer_context.select_summary_members(success, primary, 2, jax.random.PRNGKey(4))
  assert not np.array_equal(np.asarray(other_key[0]), members)


# ---------------------------------------------------------------- Prompt assembly.

P = dict(solution_header=[101, 102], another_header=[104],
         failure_header=[105, 106], feedback_header=[107], closing=[108, 109],
         summary_instruction=[111, 112, 113], summaries_header=[121, 122],
         summary_success=[131], summary_failure=[141, 142])
PIECES = TemplatePieces(**{k: jnp.asarray(v, jnp.int32) for k, v in P.items()})


def test_insert_piece_left_padded_at_insert_index():
  prompts = [[5, 6, 7, 8], [9, 10], [11, 12, 13]]
  ins = [3, 0, 7]  # 7 is clipped to the end
  lp, pad = 5, 0
  tokens = np.full((3, lp), pad, np.int32)
  mask = np.zeros((3, lp), bool)
  for row, p in enumerate(prompts):
    tokens[row, lp - len(p):] = p
    mask[row, lp - len(p):] = True
  out, out_mask, out_ins = peer_context.insert_piece(
      jnp.asarray(tokens), jnp.asarray(mask), jnp.asarray(ins, jnp.int32),
      PIECES.summary_instruction, pad)
  width = lp + len(P["summary_instruction"])
  for row, p in enumerate(prompts):
    at = min(ins[row], len(p))
    seq = p[:at] + P["summary_instruction"] + p[at:]
    expected = [pad] * (width - len(seq)) + seq
    assert np.asarray(out[row]).tolist() == expected
    assert np.asarray(out_mask[row]).tolist() == [False] * (width - len(seq)) + [True] * len(seq)
    assert int(out_ins[row]) == at + len(P["summary_instruction"])


def test_teacher_prompt_with_summaries_token_by_token():
  # One group of G = 4 rows; row 0's primary is row 2, its summaries: rows 1 and 3 (k = 2).
  real = [[5, 6, 7], [5, 6, 7], [5, 6, 7], [5, 6, 7]]
  lp, ins = 4, 2
  prompt_tokens = jnp.asarray([[0] + r for r in real], jnp.int32)
  prompt_mask = jnp.asarray([[False, True, True, True]] * 4)
  responses = jnp.asarray([[201, 202, 203, 0], [211, 212, 0, 0], [221, 222, 223, 224],
                           [231, 0, 0, 0]], jnp.int32)
  response_lengths = jnp.asarray([3, 2, 4, 1], jnp.int32)
  summaries = jnp.asarray([[301, 302, 303], [311, 0, 0], [321, 322, 0], [0, 0, 0]],
                          jnp.int32)
  summary_lengths = jnp.asarray([3, 1, 2, 0], jnp.int32)
  rows = PeerSelection(primary=jnp.asarray([2, 2, -1, -1]), another=jnp.full((4,), -1),
                       failure=jnp.asarray([-1, -1, -1, 0]), mask=jnp.ones((4,), bool))
  summary_rows = jnp.asarray([[1, 3], [0, 3], [-1, -1], [0, 1]], jnp.int32)
  successful = jnp.asarray([[False, True], [True, True], [False, False], [True, False]])
  peer_cap, summary_cap = 3, 2
  blocks = peer_context.PeerBlocks(
      responses, response_lengths, rows,
      summaries=peer_context.Summaries(summaries, summary_lengths, summary_rows, successful))
  tokens, mask = peer_context.assemble_teacher_prompts(
      prompt_tokens, prompt_mask, jnp.full((4,), ins, jnp.int32), blocks, PIECES,
      peer_cap=peer_cap, pad_id=0, summary_cap=summary_cap)
  out_len = peer_template.teacher_prompt_length(lp, PIECES, peer_cap, 0, 2, summary_cap)
  # prompt + solution block + summaries block + another + failure + closing.
  assert out_len == 4 + (2 + 3) + (2 + 2 * (2 + 2)) + (1 + 3) + (2 + 3) + 2
  assert tokens.shape == (4, out_len)
  s, f = P["summary_success"], P["summary_failure"]
  expected = [
      [5, 6] + P["solution_header"] + [221, 222, 223]
      + P["summaries_header"] + f + [311] + s + [] + P["closing"] + [7],
      [5, 6] + P["solution_header"] + [221, 222, 223]
      + P["summaries_header"] + s + [301, 302] + s + [] + P["closing"] + [7],
      [5, 6] + P["closing"] + [7],
      [5, 6] + P["summaries_header"] + s + [301, 302] + f + [311]
      + P["failure_header"] + [201, 202, 203] + P["closing"] + [7],
  ]
  for row, seq in enumerate(expected):
    want = [0] * (out_len - len(seq)) + seq
    assert np.asarray(tokens[row]).tolist() == want, row
    assert int(np.asarray(mask[row]).sum()) == len(seq)


def test_settings_reject_summaries_outside_mopd():
  config = settings.base_config()
  config.peers.summaries = True
  config.algorithm.name = "sdpo"
  with pytest.raises(settings.ConfigError, match="config.peers.summaries"):
    settings.from_config(config)
  config.algorithm.name = "mopd"
  config.peers.control = "random_peer"
  with pytest.raises(settings.ConfigError, match="config.peers.control"):
    settings.from_config(config)


# ---------------------------------------------------------------- One jitted step.


# The authors' instruction text (MOPD spec section 2), written out here.
SPEC_INSTRUCTION = ("After your answer, briefly summarize your key approach in one sentence "
                    "inside <summary> tags, e.g. <summary>...</summary>.")


def _hash_scorer(texts, refs):
  del refs
  return [Result(reward=float(sum(map(ord, t)) % 2), status="ok") for t in texts]


def _contains(seq, block):
  return any(seq[i:i + len(block)] == block for i in range(len(seq) - len(block) + 1))


def _check_summary_blocks(s, student):
  """build_teacher_inputs on fake rollouts: every row's summaries block, built in Python."""
  cfg, pc = s.step_cfg, s.step_cfg.peers
  b, g = student["prompt_tokens"].shape[0], cfg.num_samples
  n, lr = b * g, 6
  rng = np.random.default_rng(0)
  rewards = (rng.random(n) < 0.5).astype(np.float32)
  summary_lengths = rng.integers(0, pc.summary_len + 1, n).astype(np.int32)
  summaries = rng.integers(3000, 3100, (n, pc.summary_len)).astype(np.int32)
  rollouts = train_step.Rollouts(
      tokens=jnp.asarray(rng.integers(3200, 3300, (n, lr)), jnp.int32),
      logprobs=jnp.zeros((n, lr)), lengths=jnp.full((n,), lr, jnp.int32),
      finished=jnp.zeros((n,), bool), rewards=jnp.asarray(rewards),
      status=jnp.zeros((n,), jnp.int32), feedback=jnp.zeros((n, 1), jnp.int32),
      feedback_lengths=jnp.zeros((n,), jnp.int32), summaries=jnp.asarray(summaries),
      summary_lengths=jnp.asarray(summary_lengths), summary_missing=jnp.ones((n,), jnp.int32))
  inputs = jax.device_get(step_teacher.build_teacher_inputs(
      cfg, s.pieces, student, rollouts, jax.random.PRNGKey(1)))
  success = (rewards >= cfg.success_threshold).reshape(b, g)
  primary = np.asarray(peer_context.select_peers(jnp.asarray(success),
                                                 jax.random.PRNGKey(0)).primary)
  # The members the step draws (the draw itself is tested above).
  members, labels = jax.device_get(peer_context.select_summary_members(
      jnp.asarray(success), jnp.asarray(primary), min(pc.num_summaries, g - 1),
      jax.random.fold_in(jax.random.PRNGKey(1), 1)))
  texts = {name: s.tokenizer.encode(peer_template.TEMPLATE_TEXTS[name])
           for name in ("summaries_header", "summary_success", "summary_failure")}
  for row in range(n):
    block = list(texts["summaries_header"])
    for j, good in zip(members[row // g, row % g], labels[row // g, row % g]):
      other = row // g * g + j
      block += texts["summary_success" if good else "summary_failure"]
      block += summaries[other, :summary_lengths[other]].tolist()
    shown = inputs.teacher_tokens[row][inputs.teacher_mask[row]].tolist()
    assert _contains(shown, block), row
  assert inputs.rollout_mask.all()


def test_jitted_step_with_summaries(tiny_base_dir):
  config = tiny_config(tiny_base_dir, **{"peers.summaries": True, "peers.num_summaries": 2,
                                         "peers.summary_len": 8})
  s = train.setup(config, score_batch=_hash_scorer)
  batch = s.put_batch(s.train_batches.batch(0))
  student = jax.device_get(step_teacher.student_prompts(s.step_cfg.peers, s.pieces, batch,
                                                        s.tokenizer.pad_id))
  instruction = s.tokenizer.encode(peer_template.TEMPLATE_TEXTS["summary_instruction"])
  host_batch = jax.device_get(batch)
  for row in range(len(host_batch["example_id"])):
    real = host_batch["prompt_tokens"][row][host_batch["prompt_mask"][row].astype(bool)]
    ins = int(host_batch["insert_index"][row])
    got = student["prompt_tokens"][row][student["prompt_mask"][row]]
    assert got.tolist() == real[:ins].tolist() + instruction + real[ins:].tolist()
    assert int(student["insert_index"][row]) == ins + len(instruction)
    assert SPEC_INSTRUCTION in s.tokenizer.decode(got.tolist())
  _check_summary_blocks(s, student)
  # Evaluation samples from the plain prompts: the instruction is for training rollouts.
  evaluator = evaluation.Evaluator(s.settings, s.model_cfg, s.tokenizer, s.eval_batches,
                                   s.host_verifier, s.mesh, s.state_shapes.params)
  eval_batch = jax.device_get(evaluator.batch)
  plain = s.eval_batches.first(config.eval.num_prompts)
  for row in range(config.eval.num_prompts):
    real = plain["prompt_tokens"][row][plain["prompt_mask"][row].astype(bool)].tolist()
    got = eval_batch["prompt_tokens"][row][eval_batch["prompt_mask"][row].astype(bool)]
    assert got.tolist() == real
  state, metrics = s.train_step()(s.init_state(), batch)
  metrics = jax.device_get(metrics)
  assert np.isfinite(metrics["train/loss"]) and metrics["train/skipped_nonfinite"] == 0
  assert 0.0 <= metrics["train/summary_missing_fraction"] <= 1.0
  # Every rollout sees at least one other member's summary, so all enter the loss.
  assert metrics["train/reprompt_fraction"] == 1.0
  assert int(state.step) == 1
