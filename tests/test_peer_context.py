"""Tests for peer selection and teacher-prompt assembly against literal Python references."""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mopd_jax.peer_context import Feedback, PeerBlocks, assemble_teacher_prompts
from mopd_jax.peer_template import TemplatePieces, teacher_prompt_length, tokenize_pieces
from mopd_jax.peer_selection import PeerSelection, select_peers, to_row_indices

# ----------------------------------------------------------------------------- selection


def reference_selection(
    success_row,
    *,
    include_primary,
    include_another,
    include_failure,
    failure_condition,
    exclude_self_success,
    has_feedback_row=None,
):
  """Spec section 2, literally, for one group: per rollout (primary, another, failures, mask)."""
  group = len(success_row)
  successes = [j for j in range(group) if success_row[j]]
  failures = [j for j in range(group) if not success_row[j]]
  out = []
  for i in range(group):
    candidates = [j for j in successes if not (exclude_self_success and j == i)]
    candidate = candidates[0] if candidates else -1
    primary = candidate if include_primary else -1
    # `another` skips the primary candidate, and skips i only when self is excluded.
    others = [j for j in successes if j != candidate and not (exclude_self_success and j == i)]
    another = others[0] if include_another and others else -1
    allowed = include_failure and (failure_condition == "always" or candidate == -1)
    failure_set = {j for j in failures if j != i} if allowed else set()
    mask = primary >= 0 or another >= 0 or bool(failure_set)
    if has_feedback_row is not None:
      mask = mask or bool(has_feedback_row[i])
    out.append((primary, another, failure_set, mask))
  return out


ALL_PATTERNS_G4 = np.array(list(itertools.product([False, True], repeat=4)), dtype=bool)

VARIANTS = [
    dict(
        include_primary=p,
        include_another=a,
        include_failure=f,
        failure_condition=c,
        exclude_self_success=x,
    )
    for p, a, f, c, x in itertools.product(
        [True, False], [True, False], [True, False], ["always", "when_no_solution"], [True, False]
    )
]


@functools.lru_cache(maxsize=None)
def jitted_select(**config):
  return jax.jit(functools.partial(select_peers, **config))


def check_against_reference(success, selection, config, has_feedback=None):
  primary, another, failure, mask = (np.asarray(x) for x in selection)
  for field in (primary, another, failure):
    assert field.dtype == np.int32 and field.shape == success.shape
  assert mask.dtype == np.bool_ and mask.shape == success.shape
  for b, row in enumerate(success):
    feedback_row = None if has_feedback is None else has_feedback[b]
    expected = reference_selection(list(row), has_feedback_row=feedback_row, **config)
    for i, (want_primary, want_another, failure_set, want_mask) in enumerate(expected):
      where = f"group {row.astype(int).tolist()}, rollout {i}, config {config}"
      assert primary[b, i] == want_primary, where
      assert another[b, i] == want_another, where
      if failure_set:
        assert failure[b, i] in failure_set, where
      else:
        assert failure[b, i] == -1, where
      assert mask[b, i] == want_mask, where


@pytest.mark.parametrize(
    "config", VARIANTS, ids=lambda c: "-".join(f"{k[:9]}={v}" for k, v in c.items())
)
def test_select_peers_matches_reference_on_all_patterns(config):
  success = ALL_PATTERNS_G4
  selection = jitted_select(**config)(jnp.asarray(success), jax.random.key(3))
  check_against_reference(success, selection, config)


@pytest.mark.parametrize("failure_condition", ["always", "when_no_solution"])
def test_select_peers_feedback_counts_for_mask(failure_condition):
  config = dict(
      include_primary=True,
      include_another=False,
      include_failure=True,
      failure_condition=failure_condition,
      exclude_self_success=True,
  )
  success = ALL_PATTERNS_G4
  has_feedback = np.random.default_rng(0).random(success.shape) < 0.5
  selection = jitted_select(**config)(
      jnp.asarray(success), jax.random.key(0), has_feedback=jnp.asarray(has_feedback)
  )
  check_against_reference(success, selection, config, has_feedback)


def test_failure_peer_is_uniform_and_independent():
  batch = 4000
  pattern = np.array([True, False, False, True, False, False, False, False])
  success = jnp.asarray(np.tile(pattern, (batch, 1)))
  failure = np.asarray(jitted_select()(success, jax.random.key(42)).failure)
  group = pattern.size
  for i in range(group):
    eligible = [j for j in range(group) if not pattern[j] and j != i]
    counts = np.bincount(failure[:, i], minlength=group)
    assert counts[[j for j in range(group) if j not in eligible]].sum() == 0
    p = 1.0 / len(eligible)
    sigma = np.sqrt(batch * p * (1 - p))
    np.testing.assert_array_less(np.abs(counts[eligible] - batch * p), 5 * sigma)
  # Rollouts 1 and 2 draw independently: eligible sets {2,4,5,6,7} and {1,4,5,6,7} share
  # four members, so they agree with probability 4 / 25.
  same = np.mean(failure[:, 1] == failure[:, 2])
  assert abs(same - 4 / 25) < 5 * np.sqrt(4 / 25 * 21 / 25 / batch)


def test_failure_draw_depends_on_key_only():
  success = jnp.asarray(np.tile([True, False, False, False, False, False], (64, 1)))
  select = jitted_select()
  first = np.asarray(select(success, jax.random.key(1)).failure)
  again = np.asarray(select(success, jax.random.key(1)).failure)
  other = np.asarray(select(success, jax.random.key(2)).failure)
  np.testing.assert_array_equal(first, again)
  assert (first != other).any()


def test_select_peers_accepts_raw_uint32_key():
  success = jnp.asarray(ALL_PATTERNS_G4)
  selection = jitted_select()(success, jax.random.PRNGKey(0))
  check_against_reference(ALL_PATTERNS_G4, selection, VARIANTS[0])


def blocks(selection, b, i):
  """Variant name of the context of rollout (b, i): counts of S and F blocks."""
  num_s = int(selection.primary[b, i] >= 0) + int(selection.another[b, i] >= 0)
  num_f = int(selection.failure[b, i] >= 0)
  return f"{num_s}S{num_f}F"


def test_spec_consequences_g8_2s1f_always():
  groups = {
      "all_success": [1] * 8,
      "all_failure": [0] * 8,
      "one_success": [0, 0, 1, 0, 0, 0, 0, 0],
      "two_successes": [0, 1, 0, 0, 0, 1, 0, 0],
      "four_successes": [1, 0, 1, 0, 0, 1, 1, 0],
      "one_failure": [1, 1, 1, 1, 0, 1, 1, 1],
  }
  success = np.array(list(groups.values()), dtype=bool)
  selection = jax.tree.map(np.asarray, jitted_select()(jnp.asarray(success), jax.random.key(0)))
  names = {name: [blocks(selection, b, i) for i in range(8)] for b, name in enumerate(groups)}
  assert names["all_success"] == ["2S0F"] * 8
  assert names["all_failure"] == ["0S1F"] * 8
  # Mixed groups: 2S1F or 1S1F, except that a lone success has no other success (1F only)
  # and a lone failure has no other failure (2S only).
  assert names["one_success"] == ["1S1F", "1S1F", "0S1F", "1S1F", "1S1F", "1S1F", "1S1F", "1S1F"]
  assert names["two_successes"] == ["2S1F", "1S1F", "2S1F", "2S1F", "2S1F", "1S1F", "2S1F", "2S1F"]
  assert names["four_successes"] == ["2S1F"] * 8
  assert names["one_failure"] == ["2S1F"] * 4 + ["2S0F"] + ["2S1F"] * 3
  assert selection.mask.all()


def test_rollout_may_see_itself_as_another_without_self_exclusion():
  success = jnp.asarray([[True, True, False, True]])
  keep_self = jitted_select(exclude_self_success=False)(success, jax.random.key(0))
  np.testing.assert_array_equal(keep_self.primary, [[0, 0, 0, 0]])
  np.testing.assert_array_equal(keep_self.another, [[1, 1, 1, 1]])
  exclude_self = jitted_select()(success, jax.random.key(0))
  np.testing.assert_array_equal(exclude_self.primary, [[1, 0, 0, 0]])
  np.testing.assert_array_equal(exclude_self.another, [[3, 3, 1, 1]])


def test_group_without_blocks_is_masked_out():
  success = jnp.asarray([[False] * 8, [True] + [False] * 7])
  one_s = dict(include_primary=True, include_another=False, include_failure=False)
  selection = jitted_select(**one_s)(success, jax.random.key(0))
  np.testing.assert_array_equal(selection.mask[0], np.zeros(8, bool))
  np.testing.assert_array_equal(selection.mask[1], np.array([False] + [True] * 7))
  with_feedback = jitted_select(**one_s)(
      success, jax.random.key(0), has_feedback=jnp.asarray([[True] + [False] * 7] * 2)
  )
  np.testing.assert_array_equal(with_feedback.mask[0], np.array([True] + [False] * 7))


def test_to_row_indices():
  selection = PeerSelection(
      primary=jnp.asarray([[1, -1, 0], [2, 0, -1]], jnp.int32),
      another=jnp.asarray([[-1, 2, 2], [-1, -1, 1]], jnp.int32),
      failure=jnp.asarray([[0, 0, -1], [1, 2, 0]], jnp.int32),
      mask=jnp.asarray([[True, True, False], [True, False, True]]),
  )
  rows = jax.jit(to_row_indices)(selection)
  np.testing.assert_array_equal(rows.primary, [[1, -1, 0], [5, 3, -1]])
  np.testing.assert_array_equal(rows.another, [[-1, 2, 2], [-1, -1, 4]])
  np.testing.assert_array_equal(rows.failure, [[0, 0, -1], [4, 5, 3]])
  np.testing.assert_array_equal(rows.mask, selection.mask)
  assert rows.primary.dtype == jnp.int32


def test_select_peers_rejects_bad_arguments():
  success = jnp.zeros((2, 4), bool)
  with pytest.raises(ValueError, match="'sometimes'.*always.*when_no_solution"):
    select_peers(success, jax.random.key(0), failure_condition="sometimes")
  with pytest.raises(ValueError, match="int32"):
    select_peers(jnp.zeros((2, 4), jnp.int32), jax.random.key(0))
  with pytest.raises(ValueError, match=r"\(8,\)"):
    select_peers(jnp.zeros((8,), bool), jax.random.key(0))
  with pytest.raises(ValueError, match="has_feedback"):
    select_peers(success, jax.random.key(0), has_feedback=jnp.zeros((2, 3), bool))


# ----------------------------------------------------------------------------- assembly

PAD = 0
PROMPT_PAD_JUNK = 8888  # under prompt_mask == False; must never reach the output
RESPONSE_PAD_JUNK = 7777  # past response/feedback lengths; must never reach the output

PIECES_LISTS = dict(
    solution_header=[1001, 1002, 1003],
    another_header=[1021, 1022, 1023, 1024],
    failure_header=[1031, 1032, 1033, 1034, 1035],
    feedback_header=[1041, 1042, 1043],
    closing=[1051, 1052, 1053, 1054],
)
PIECES = TemplatePieces(**{k: jnp.asarray(v, jnp.int32) for k, v in PIECES_LISTS.items()})


def reference_teacher_prompt(real, ins, peers, feedback, *, peer_cap, feedback_cap, out_len):
  """Spec template by list concatenation; returns left-padded (tokens, mask)."""
  p = PIECES_LISTS
  primary, another, failure = peers
  seq = list(real[:ins])
  if primary is not None:
    seq += p["solution_header"] + primary[:peer_cap]
  if another is not None:
    seq += p["another_header"] + another[:peer_cap]
  if failure is not None:
    seq += p["failure_header"] + failure[:peer_cap]
  if feedback:
    seq += p["feedback_header"] + feedback[:feedback_cap]
  seq += p["closing"] + list(real[ins:])
  assert len(seq) <= out_len
  pad = out_len - len(seq)
  return [PAD] * pad + seq, [False] * pad + [True] * len(seq)


def random_assembly_inputs(
    rng, *, num_rows, prompt_len, response_len, peer_cap, feedback_len, feedback_cap
):
  real_lens = rng.integers(0, prompt_len + 1, num_rows)
  real_lens[0] = prompt_len
  prompt_tokens = np.full((num_rows, prompt_len), PROMPT_PAD_JUNK, np.int32)
  prompt_mask = np.zeros((num_rows, prompt_len), bool)
  reals = []
  for n, length in enumerate(real_lens):
    real = rng.integers(1, 500, length).tolist()
    prompt_tokens[n, prompt_len - length :] = real
    prompt_mask[n, prompt_len - length :] = True
    reals.append(real)
  insert_index = np.array([rng.integers(0, length + 1) for length in real_lens], np.int32)

  lengths = rng.integers(0, response_len + 1, num_rows).astype(np.int32)
  lengths[:3] = response_len  # rows used as peers of row 0: every block at its cap
  lengths[3] = 0
  responses = np.full((num_rows, response_len), RESPONSE_PAD_JUNK, np.int32)
  for n, length in enumerate(lengths):
    responses[n, :length] = rng.integers(500, 1000, length)
  row_fields = rng.integers(-1, num_rows, (3, num_rows)).astype(np.int32)
  row_fields[rng.random((3, num_rows)) < 0.3] = -1
  row_fields[:, 0] = [0, 1, 2]
  row_fields[:, 1] = [3, 3, -1]
  row_fields[:, 2] = [-1, -1, -1]

  feedback = None
  if feedback_len is not None:
    fb_lengths = rng.integers(0, feedback_len + 1, num_rows).astype(np.int32)
    fb_lengths[0] = feedback_len
    fb_lengths[2] = 0
    fb_tokens = np.full((num_rows, feedback_len), RESPONSE_PAD_JUNK, np.int32)
    for n, length in enumerate(fb_lengths):
      fb_tokens[n, :length] = rng.integers(2000, 2500, length)
    feedback = (fb_tokens, fb_lengths)
  return dict(
      prompt_tokens=prompt_tokens,
      prompt_mask=prompt_mask,
      insert_index=insert_index,
      responses=responses,
      response_lengths=lengths,
      rows=row_fields,
      reals=reals,
      feedback=feedback,
  )


ASSEMBLY_CASES = [
    # (response_len, peer_cap, feedback_len, feedback_cap)
    (9, 6, None, 0),
    (9, 6, 7, 5),
    (4, 6, 3, 5),
    (9, 6, None, 4),
    (5, 0, 4, 4),
]


@pytest.mark.parametrize("response_len,peer_cap,feedback_len,feedback_cap", ASSEMBLY_CASES)
def test_assemble_matches_reference(response_len, peer_cap, feedback_len, feedback_cap):
  rng = np.random.default_rng(response_len * 100 + peer_cap * 10 + feedback_cap)
  num_rows, prompt_len = 32, 10
  data = random_assembly_inputs(
      rng,
      num_rows=num_rows,
      prompt_len=prompt_len,
      response_len=response_len,
      peer_cap=peer_cap,
      feedback_len=feedback_len,
      feedback_cap=feedback_cap,
  )
  rows = PeerSelection(*(jnp.asarray(r) for r in data["rows"]), mask=jnp.ones((num_rows,), bool))
  feedback = None
  if data["feedback"] is not None:
    feedback = Feedback(jnp.asarray(data["feedback"][0]), jnp.asarray(data["feedback"][1]))
  assemble = jax.jit(
      functools.partial(
          assemble_teacher_prompts, peer_cap=peer_cap, pad_id=PAD, feedback_cap=feedback_cap
      )
  )
  tokens, mask = assemble(
      jnp.asarray(data["prompt_tokens"]),
      jnp.asarray(data["prompt_mask"]),
      jnp.asarray(data["insert_index"]),
      PeerBlocks(jnp.asarray(data["responses"]), jnp.asarray(data["response_lengths"]), rows,
                 feedback=feedback),
      PIECES,
  )
  out_len = teacher_prompt_length(prompt_len, PIECES, peer_cap, feedback_cap)
  assert tokens.shape == (num_rows, out_len) and tokens.dtype == jnp.int32
  assert mask.shape == (num_rows, out_len) and mask.dtype == jnp.bool_
  tokens, mask = np.asarray(tokens), np.asarray(mask)

  def peer_text(row):
    return None if row < 0 else (data["responses"][row, : data["response_lengths"][row]].tolist())

  for n in range(num_rows):
    peers = [peer_text(data["rows"][k][n]) for k in range(3)]
    fb = None
    if data["feedback"] is not None:
      fb_tokens, fb_lengths = data["feedback"]
      fb = fb_tokens[n, : fb_lengths[n]].tolist()
    want_tokens, want_mask = reference_teacher_prompt(
        data["reals"][n],
        int(data["insert_index"][n]),
        peers,
        fb,
        peer_cap=peer_cap,
        feedback_cap=feedback_cap,
        out_len=out_len,
    )
    np.testing.assert_array_equal(tokens[n], want_tokens, err_msg=f"row {n}")
    np.testing.assert_array_equal(mask[n], want_mask, err_msg=f"row {n}")
    suffix = PIECES_LISTS["closing"] + data["reals"][n][data["insert_index"][n] :]
    assert tokens[n, out_len - len(suffix) :].tolist() == suffix
  assert not np.isin(tokens, [PROMPT_PAD_JUNK, RESPONSE_PAD_JUNK]).any()
  # Left padding: the mask is False then True in every row.
  assert (np.diff(mask.astype(int), axis=1) >= 0).all()
  # Row 0 has a full prompt, three peers at their cap and full feedback: it fills the buffer,
  # except for the feedback room when no feedback is passed.
  if response_len >= peer_cap and (feedback_len is None or feedback_len >= feedback_cap):
    unused = (
        0
        if feedback_len is not None or feedback_cap == 0
        else (len(PIECES_LISTS["feedback_header"]) + feedback_cap)
    )
    assert (~mask[0]).sum() == unused


def test_assemble_cuts_blocks_to_block_lengths():
  rng = np.random.default_rng(11)
  num_rows, prompt_len, response_len, peer_cap = 16, 6, 9, 7
  data = random_assembly_inputs(
      rng,
      num_rows=num_rows,
      prompt_len=prompt_len,
      response_len=response_len,
      peer_cap=peer_cap,
      feedback_len=None,
      feedback_cap=0,
  )
  block_lengths = rng.integers(0, response_len + 2, (num_rows, 3)).astype(np.int32)
  block_lengths[0] = [2, 0, 9]  # row 0 shows three peers of length 9
  rows = PeerSelection(*(jnp.asarray(r) for r in data["rows"]), mask=jnp.ones((num_rows,), bool))
  tokens, mask = jax.jit(
      functools.partial(assemble_teacher_prompts, peer_cap=peer_cap, pad_id=PAD)
  )(
      jnp.asarray(data["prompt_tokens"]),
      jnp.asarray(data["prompt_mask"]),
      jnp.asarray(data["insert_index"]),
      PeerBlocks(jnp.asarray(data["responses"]), jnp.asarray(data["response_lengths"]), rows,
                 block_lengths=jnp.asarray(block_lengths)),
      PIECES,
  )
  out_len = teacher_prompt_length(prompt_len, PIECES, peer_cap)
  for n in range(num_rows):
    peers = []
    for slot in range(3):
      row = data["rows"][slot][n]
      shown = min(data["response_lengths"][row], block_lengths[n, slot]) if row >= 0 else 0
      peers.append(None if row < 0 else data["responses"][row, :shown].tolist())
    want_tokens, want_mask = reference_teacher_prompt(
        data["reals"][n], int(data["insert_index"][n]), peers, None,
        peer_cap=peer_cap, feedback_cap=0, out_len=out_len,
    )
    np.testing.assert_array_equal(np.asarray(tokens[n]), want_tokens, err_msg=f"row {n}")
    np.testing.assert_array_equal(np.asarray(mask[n]), want_mask, err_msg=f"row {n}")
  # A block cut to 0 tokens keeps its header: the slot is present, its text is empty.
  headers = PIECES_LISTS["another_header"]
  row0 = np.asarray(tokens[0]).tolist()
  start = next(k for k in range(len(row0)) if row0[k : k + len(headers)] == headers)
  assert row0[start + len(headers) : start + len(headers) + 5] == PIECES_LISTS["failure_header"]


class _CharTokenizer:
  """One token per character (its code point), so token concatenation is text concatenation."""

  def encode(self, text):
    return [ord(c) for c in text]


# The spec's effective texts (MOPD spec section 2), written out here rather than read from
# peer_context: no blank line after the solution block.
SPEC_2S1F_WITH_FEEDBACK = (
    "<user>Add two numbers."
    "\nCorrect solution:\n\ndef f(a, b): return a + b"
    "\nAnother successful solution:\n\nf = lambda a, b: b + a"
    "\nA known failed solution (avoid repeating this mistake):\n\ndef f(a, b): return a - b"
    "\nThe following is feedback from your unsuccessful earlier attempt:\n\n"
    "Test 1: expected 3, got -1"
    "\n\nCorrectly solve the original question.</user><assistant>"
)


def test_assembled_text_is_the_spec_template():
  tok = _CharTokenizer()
  prompt, suffix = "<user>Add two numbers.", "</user><assistant>"
  responses = ["def f(a, b): return a + b", "f = lambda a, b: b + a",
               "def f(a, b): return a - b"]
  feedback = "Test 1: expected 3, got -1"
  width = max(map(len, responses))
  response_tokens = np.zeros((3, width), np.int32)
  for row, text in enumerate(responses):
    response_tokens[row, :len(text)] = tok.encode(text)
  real = tok.encode(prompt + suffix)
  selection = PeerSelection(primary=jnp.asarray([0]), another=jnp.asarray([1]),
                            failure=jnp.asarray([2]), mask=jnp.ones((1,), bool))
  lengths = jnp.asarray([len(t) for t in responses], jnp.int32)
  feedback_part = Feedback(jnp.asarray([tok.encode(feedback)], jnp.int32),
                           jnp.asarray([len(feedback)], jnp.int32))
  tokens, mask = assemble_teacher_prompts(
      jnp.asarray([real], jnp.int32), jnp.ones((1, len(real)), bool),
      jnp.asarray([len(prompt)], jnp.int32),
      PeerBlocks(jnp.asarray(response_tokens), lengths, selection, feedback=feedback_part),
      tokenize_pieces(tok), peer_cap=width, pad_id=PAD, feedback_cap=len(feedback))
  text = "".join(map(chr, np.asarray(tokens[0])[np.asarray(mask[0])]))
  assert text == SPEC_2S1F_WITH_FEEDBACK
  # 1S alone: the solution block runs straight into the closing instruction.
  selection = selection._replace(another=jnp.asarray([-1]), failure=jnp.asarray([-1]))
  tokens, mask = assemble_teacher_prompts(
      jnp.asarray([real], jnp.int32), jnp.ones((1, len(real)), bool),
      jnp.asarray([len(prompt)], jnp.int32),
      PeerBlocks(jnp.asarray(response_tokens), lengths, selection),
      tokenize_pieces(tok), peer_cap=width, pad_id=PAD)
  text = "".join(map(chr, np.asarray(tokens[0])[np.asarray(mask[0])]))
  assert text == ("<user>Add two numbers.\nCorrect solution:\n\ndef f(a, b): return a + b"
                  "\n\nCorrectly solve the original question.</user><assistant>")


def test_assemble_rejects_feedback_without_room():
  n, lp = 2, 4
  minus_one = jnp.full((n,), -1, jnp.int32)
  rows = PeerSelection(minus_one, minus_one, minus_one, jnp.zeros((n,), bool))
  blocks = PeerBlocks(jnp.zeros((n, 3), jnp.int32), jnp.zeros((n,), jnp.int32), rows)
  args = (
      jnp.zeros((n, lp), jnp.int32),
      jnp.ones((n, lp), bool),
      jnp.zeros((n,), jnp.int32),
      blocks,
      PIECES,
  )
  with pytest.raises(ValueError, match="feedback_cap=0"):
    assemble_teacher_prompts(
        *args[:3],
        blocks._replace(feedback=Feedback(jnp.zeros((n, 3), jnp.int32),
                                          jnp.zeros((n,), jnp.int32))),
        PIECES,
        peer_cap=2,
        pad_id=PAD,
    )
  with pytest.raises(ValueError, match="insert_index"):
    assemble_teacher_prompts(
        *args[:2], jnp.zeros((n + 1,), jnp.int32), *args[3:], peer_cap=2, pad_id=PAD
    )


def test_teacher_prompt_length():
  pieces_len = 3 + 4 + 5 + 4
  assert teacher_prompt_length(10, PIECES, 6) == 10 + pieces_len + 3 * 6
  assert teacher_prompt_length(10, PIECES, 6, 5) == 10 + pieces_len + 3 * 6 + 3 + 5
  with pytest.raises(ValueError, match="peer_cap.*-1"):
    teacher_prompt_length(10, PIECES, -1)


