"""Matched-budget peer controls: budgets against a literal 2S1F reference, and invariants."""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mopd_jax import peer_context, peer_template
from mopd_jax.peer_controls import CONTROLS, matched_control

GROUP = 4
PEER_CAP = 6


def make_batch(seed):
  rng = np.random.default_rng(seed)
  success = rng.random((9, GROUP)) < 0.5
  success[0] = True  # all success: 2S each
  success[1] = False  # all failure: 1F each
  success[2] = [True, False, False, False]  # a lone success
  success[3] = [True, True, True, False]  # a lone failure, three successes
  lengths = rng.integers(0, 10, (9, GROUP)).astype(np.int32)  # some above PEER_CAP, some 0
  return success, lengths


def reference_budget(success_row, i, exclude_self_success):
  """2S1F of rollout i, literally: (primary, another, set of possible failures)."""
  successes = [j for j in range(len(success_row)) if success_row[j]]
  listed = [j for j in successes if not (exclude_self_success and j == i)]
  primary = listed[0] if listed else -1
  another = listed[1] if len(listed) > 1 else -1
  failures = {j for j in range(len(success_row)) if not success_row[j] and j != i}
  return primary, another, failures


@functools.lru_cache(maxsize=None)
def jitted_control(**kwargs):
  return jax.jit(functools.partial(matched_control, peer_cap=PEER_CAP, **kwargs))


def run(success, lengths, seed=0, **kwargs):
  out = jitted_control(**kwargs)(jnp.asarray(success), jnp.asarray(lengths), jax.random.key(seed))
  return jax.tree.map(np.asarray, out)


def slots_of(out, b, i):
  return [int(out.rows.primary[b, i]), int(out.rows.another[b, i]), int(out.rows.failure[b, i])]


def check_control_rows(control, rows, success, b, i, exclude_self_success):
  """Rows shown to rollout (b, i) obey the control's pool rules."""
  flat_success = success.reshape(-1)
  present = [r for r in rows if r >= 0]
  assert len(set(present)) == len(present), (b, i, rows)
  if control == "random_peer":
    assert all(r // GROUP == b and r != b * GROUP + i for r in present), (b, i, rows)
  elif control == "unrelated_prompt":
    assert all(r // GROUP != b and flat_success[r] for r in present), (b, i, rows)
  else:
    assert all(flat_success[r] for r in present), (b, i, rows)
    listed = [
        b * GROUP + j for j in range(GROUP)
        if success[b, j] and not (exclude_self_success and j == i)
    ]
    same = [r for r in present if r // GROUP == b]
    # Same-prompt successes come first and in group order; other prompts only top up.
    assert present[: len(same)] == same == listed[: len(same)], (b, i, rows)
    if len(present) > len(same):
      assert len(same) == len(listed), (b, i, rows)


def pool_size(control, success, b, i, exclude_self_success):
  """Distinct peers the control may draw for rollout (b, i)."""
  other_successes = int(success.sum() - success[b].sum())
  if control == "random_peer":
    return GROUP - 1
  if control == "unrelated_prompt":
    return other_successes
  return other_successes + sum(
      bool(success[b, j]) and not (exclude_self_success and j == i) for j in range(GROUP)
  )


CASES = list(itertools.product(CONTROLS, [True, False]))


@pytest.mark.parametrize("control,exclude_self_success", CASES)
def test_block_budget_matches_2s1f(control, exclude_self_success):
  success, lengths = make_batch(1)
  out = run(success, lengths, control=control, budget="blocks",
            exclude_self_success=exclude_self_success)
  flat_lengths = lengths.reshape(-1)
  for b, i in itertools.product(range(success.shape[0]), range(GROUP)):
    primary, another, failures = reference_budget(success[b], i, exclude_self_success)
    used = [primary >= 0, another >= 0, bool(failures)]
    assert out.budget_blocks[b, i] == sum(used)
    fixed = sum(min(lengths[b, j], PEER_CAP) for j in (primary, another) if j >= 0)
    drawn = out.budget_tokens[b, i] - fixed
    if failures:
      assert drawn in {min(lengths[b, j], PEER_CAP) for j in failures}, (b, i)
    else:
      assert drawn == 0, (b, i)

    rows = slots_of(out, b, i)
    check_control_rows(control, rows, success, b, i, exclude_self_success)
    present = [r >= 0 for r in rows]
    # Blocks only in the slots the 2S1F context uses ...
    assert all(u or not p for u, p in zip(used, present)), (b, i, rows)
    # ... and in all of them whenever the pool is large enough.
    pool = pool_size(control, success, b, i, exclude_self_success)
    assert sum(present) == min(sum(used), pool), (b, i, rows)
    want_lengths = [min(flat_lengths[r], PEER_CAP) if r >= 0 else 0 for r in rows]
    np.testing.assert_array_equal(out.block_lengths[b, i], want_lengths)
    assert out.rows.mask[b, i] == any(present)
    if control == "success_only_matched" and sum(present) == sum(used):
      # The 2S1F primary and another stay where they were.
      assert rows[0] == (b * GROUP + primary if primary >= 0 else -1)
      assert rows[1] == (b * GROUP + another if another >= 0 else -1)


@pytest.mark.parametrize("control,exclude_self_success", CASES)
def test_token_budget_matches_2s1f(control, exclude_self_success):
  success, lengths = make_batch(2)
  blocks = run(success, lengths, control=control, budget="blocks",
               exclude_self_success=exclude_self_success)
  out = run(success, lengths, control=control, budget="tokens",
            exclude_self_success=exclude_self_success)
  np.testing.assert_array_equal(out.budget_tokens, blocks.budget_tokens)
  flat_lengths = lengths.reshape(-1)
  exact = 0
  for b, i in itertools.product(range(success.shape[0]), range(GROUP)):
    rows = slots_of(out, b, i)
    check_control_rows(control, rows, success, b, i, exclude_self_success)
    present = [r >= 0 for r in rows]
    # Slots fill in order primary, another, failure: no gaps.
    assert present == sorted(present, reverse=True), (b, i, rows)
    natural = [min(flat_lengths[r], PEER_CAP) if r >= 0 else 0 for r in rows]
    shown = out.block_lengths[b, i].tolist()
    total, budget = sum(shown), int(out.budget_tokens[b, i])
    assert total <= budget, (b, i)
    assert all(s <= n for s, n in zip(shown, natural)), (b, i)
    # Only the last block may be cut, and only to meet the budget exactly.
    num = sum(present)
    assert shown[: max(num - 1, 0)] == natural[: max(num - 1, 0)], (b, i)
    if total < budget:
      assert shown == natural, (b, i)
      # Short of the budget only when the pool or the three slots ran out.
      assert num == min(3, pool_size(control, success, b, i, exclude_self_success)), (b, i)
    else:
      exact += budget > 0
    assert out.rows.mask[b, i] == any(present)
  assert exact >= 10


def test_token_control_feeds_the_assembly():
  """Assembled teacher prompts show exactly the token budget of peer text."""
  success, lengths = make_batch(3)
  lengths = np.full_like(lengths, 9)
  num_rows = success.size
  responses = 100 + np.arange(num_rows * 9, dtype=np.int32).reshape(num_rows, 9)
  out = jitted_control(control="unrelated_prompt", budget="tokens")(
      jnp.asarray(success), jnp.asarray(lengths), jax.random.key(0)
  )
  pieces = peer_template.TemplatePieces(*(jnp.asarray([k + 1], jnp.int32) for k in range(5)))
  rows = jax.tree.map(lambda x: x.reshape(-1), out.rows)
  tokens, _ = peer_context.assemble_teacher_prompts(
      jnp.full((num_rows, 2), 50, jnp.int32),
      jnp.ones((num_rows, 2), bool),
      jnp.full((num_rows,), 1, jnp.int32),
      peer_context.PeerBlocks(jnp.asarray(responses), jnp.asarray(lengths.reshape(-1)), rows,
                              block_lengths=out.block_lengths.reshape(num_rows, 3)),
      pieces,
      peer_cap=PEER_CAP,
      pad_id=0,
  )
  peer_tokens = (np.asarray(tokens) >= 100).sum(axis=1)
  np.testing.assert_array_equal(peer_tokens, np.asarray(out.block_lengths).sum(-1).reshape(-1))
  # Every rollout with a budget gets it in full: other prompts have successes to spare.
  has_budget = np.asarray(out.budget_tokens).reshape(-1) > 0
  np.testing.assert_array_equal(
      peer_tokens[has_budget], np.asarray(out.budget_tokens).reshape(-1)[has_budget]
  )


def test_random_peer_is_uniform_over_the_group():
  batch = 3000
  success = np.tile([True, False, False, True], (batch, 1))
  lengths = np.full((batch, GROUP), 3, np.int32)
  out = run(success, lengths, control="random_peer", budget="blocks")
  # All four rollouts have 2S1F-sized budgets of at least two blocks; the first block is
  # uniform over the three other members of the group, whatever their labels.
  for i in range(GROUP):
    first = out.rows.primary[:, i] - np.arange(batch) * GROUP
    counts = np.bincount(first, minlength=GROUP)
    assert counts[i] == 0
    others = [j for j in range(GROUP) if j != i]
    sigma = np.sqrt(batch * (1 / 3) * (2 / 3))
    np.testing.assert_array_less(np.abs(counts[others] - batch / 3), 5 * sigma)


def test_controls_depend_on_the_key():
  success, lengths = make_batch(4)
  for control in ("random_peer", "unrelated_prompt"):
    a = run(success, lengths, seed=0, control=control)
    again = run(success, lengths, seed=0, control=control)
    b = run(success, lengths, seed=1, control=control)
    np.testing.assert_array_equal(a.rows.primary, again.rows.primary)
    assert (a.rows.primary != b.rows.primary).any()


def test_matched_control_rejects_bad_arguments():
  success, lengths = jnp.zeros((2, 3), bool), jnp.zeros((2, 3), jnp.int32)
  key = jax.random.key(0)
  with pytest.raises(ValueError, match="'nearest_peer'.*random_peer"):
    matched_control(success, lengths, key, control="nearest_peer", peer_cap=4)
  with pytest.raises(ValueError, match="'bytes'.*blocks.*tokens"):
    matched_control(success, lengths, key, control="random_peer", peer_cap=4, budget="bytes")
  with pytest.raises(ValueError, match=r"response_lengths.*\(2, 4\)"):
    matched_control(success, jnp.zeros((2, 4), jnp.int32), key, control="random_peer",
                    peer_cap=4)
  with pytest.raises(ValueError, match="peer_cap.*0"):
    matched_control(success, lengths, key, control="random_peer", peer_cap=0)
