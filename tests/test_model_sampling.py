"""Transformer forward, KV cache and sampler against brute-force recomputation."""

import functools

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from mopd_jax.models import decoding
from mopd_jax.models import transformer as T
from mopd_jax.sampling import (Sampler, filter_logits, sample_categorical,
                               weights_for_decode)

CFG = T.ModelConfig(vocab_size=61, num_layers=2, embed_dim=32, num_heads=4,
                    num_kv_heads=2, head_dim=8, mlp_dim=64, qk_norm=True,
                    tie_embeddings=False, remat_policy="none")
EOS = 1


@pytest.fixture(scope="module")
def params():
  p = T.init_params(CFG, jax.random.PRNGKey(0))
  # Larger weights than the init so that greedy paths are varied, not constant.
  leaves, tree = jax.tree.flatten(p)
  keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
  return jax.tree.unflatten(tree, [x + 0.3 * jax.random.normal(k, x.shape)
                                   for x, k in zip(leaves, keys)])


@pytest.fixture(scope="module")
def prompts():
  tokens = np.asarray(jax.random.randint(jax.random.PRNGKey(2), (3, 7), 3, CFG.vocab_size))
  lengths = np.array([4, 7, 2])
  mask = np.arange(7)[None, :] >= (7 - lengths)[:, None]  # left padding
  tokens = np.where(mask, tokens, 0)
  return tokens, mask


_WIDTH = 24  # every brute-force forward is right-padded to this width: one compilation
_logits = jax.jit(T.logits, static_argnums=0)


def _full_logits(params, seq):
  """Logits [len(seq), V] of one unpadded sequence (right padding changes no earlier one)."""
  tokens = np.zeros((1, _WIDTH), np.int32)
  tokens[0, :len(seq)] = seq
  mask = np.arange(_WIDTH)[None] < len(seq)
  return np.asarray(_logits(CFG, params, tokens, mask)[0, :len(seq)])


def test_param_count_and_axes(params):
  assert sum(x.size for x in jax.tree.leaves(params)) == CFG.num_params
  axes = T.param_logical_axes(CFG)
  flat_axes = jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
  assert len(flat_axes) == len(jax.tree.leaves(params))
  for spec, leaf in zip(flat_axes, jax.tree.leaves(params)):
    assert len(spec) == leaf.ndim and all(name is not None for name in spec)


def test_padding_does_not_change_logits(params, prompts):
  tokens, mask = prompts
  padded = np.asarray(T.logits(CFG, params, jnp.asarray(tokens), jnp.asarray(mask)))
  for row in range(tokens.shape[0]):
    real = tokens[row][mask[row]]
    np.testing.assert_allclose(padded[row][mask[row]], _full_logits(params, real),
                               atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("block,unrolled", [(2, False), (8, False), (2, True)])
def test_cached_decode_matches_full_forward(params, prompts, block, unrolled):
  """Prefill + decode steps (2 samples sharing each prompt cache) equal the full forward."""
  tokens, mask = prompts
  b, lp = tokens.shape
  g, steps = 2, 5
  extra = np.asarray(jax.random.randint(jax.random.PRNGKey(3), (b * g, steps), 3,
                                        CFG.vocab_size))
  seq = np.concatenate([np.repeat(tokens, g, 0), extra], 1)
  seq_mask = np.concatenate([np.repeat(mask, g, 0), np.ones_like(extra, bool)], 1)
  full = np.asarray(T.logits(CFG, params, jnp.asarray(seq), jnp.asarray(seq_mask)))
  positions = T.positions_from_mask(jnp.asarray(seq_mask))
  hidden, prompt_cache = decoding.prefill(CFG, params, jnp.asarray(tokens), jnp.asarray(mask))
  prompt_logits = np.repeat(np.asarray(T.project(CFG, params, hidden)), g, 0)
  np.testing.assert_allclose(prompt_logits[seq_mask[:, :lp]], full[:, :lp][seq_mask[:, :lp]],
                             atol=2e-5, rtol=2e-5)
  cache = decoding.init_response_cache(CFG, b * g, 8)
  # Slots of blocks not yet written hold NaN: reading them would poison the output.
  cache = jax.tree.map(lambda x: x.at[:, :, :, block:].set(jnp.nan), cache)
  step = jax.jit(functools.partial(decoding.decode_step, CFG, block=block))
  decode_params = decoding.unstack_layers(params) if unrolled else params
  for t in range(steps):
    if t % block == 0:  # the block about to be written starts clean
      cache = jax.tree.map(lambda x: x.at[:, :, :, t:t + block].set(0.0), cache)
    hidden, cache = step(decode_params, jnp.asarray(seq[:, lp + t:lp + t + 1]),
                         positions[:, lp + t:lp + t + 1], prompt_cache, jnp.asarray(mask),
                         cache, jnp.int32(t))
    np.testing.assert_allclose(np.asarray(T.project(CFG, params, hidden[:, 0])),
                               full[:, lp + t], atol=2e-5, rtol=2e-5)


def test_greedy_sampling_equals_repeated_argmax(params, prompts):
  tokens, mask = prompts
  sampler = Sampler(CFG, max_new_tokens=10, stop_ids=(EOS,), pad_id=0, temperature=0.0,
                    num_samples=2)
  out = jax.device_get(jax.jit(sampler.__call__)(params, tokens, mask, jax.random.PRNGKey(0)))
  assert out.tokens.shape == (6, 10)
  for row in range(tokens.shape[0]):
    seq = list(tokens[row][mask[row]])
    expected, logps = [], []
    for _ in range(10):
      logits = _full_logits(params, seq)[-1]
      nxt = int(np.argmax(logits))
      logps.append(float(jax.nn.log_softmax(logits)[nxt]))
      expected.append(nxt)
      seq.append(nxt)
      if nxt == EOS:
        break
    for g in range(2):
      r = 2 * row + g
      n = len(expected)
      assert out.lengths[r] == n
      np.testing.assert_array_equal(out.tokens[r, :n], expected)
      np.testing.assert_allclose(out.logprobs[r, :n], logps, atol=1e-4)
      assert (out.tokens[r, n:] == 0).all()


def test_stochastic_sampling_logprobs_and_determinism(params, prompts):
  tokens, mask = prompts
  sampler = Sampler(CFG, max_new_tokens=6, stop_ids=(EOS,), pad_id=0, temperature=0.7,
                    num_samples=3)
  fn = jax.jit(sampler.__call__)
  a = jax.device_get(fn(params, tokens, mask, jax.random.PRNGKey(5)))
  b = jax.device_get(fn(params, tokens, mask, jax.random.PRNGKey(5)))
  c = jax.device_get(fn(params, tokens, mask, jax.random.PRNGKey(6)))
  np.testing.assert_array_equal(a.tokens, b.tokens)
  assert not np.array_equal(a.tokens, c.tokens)
  # The recorded log-probs are those of the temperature-scaled full forward.
  row = 4  # prompt 1, sample 1
  seq = list(tokens[1][mask[1]])
  for t in range(a.lengths[row]):
    logits = _full_logits(params, seq)[-1] / 0.7
    tok = int(a.tokens[row, t])
    np.testing.assert_allclose(a.logprobs[row, t], jax.nn.log_softmax(logits)[tok], atol=1e-4)
    seq.append(tok)


def test_early_exit_when_all_rows_stop(params, prompts):
  tokens, mask = prompts
  # Every token is a stop token: one step, length 1 everywhere.
  sampler = Sampler(CFG, max_new_tokens=8, stop_ids=tuple(range(CFG.vocab_size)), pad_id=0,
                    temperature=1.0)
  out = jax.device_get(jax.jit(sampler.__call__)(params, tokens, mask, jax.random.PRNGKey(0)))
  assert (out.lengths == 1).all() and out.finished.all()
  assert (out.tokens[:, 1:] == 0).all()


def test_sample_categorical_frequencies_match_softmax():
  """300 tokens (3 blocks of 128, the last padded); excluded tokens are never drawn."""
  logits = 2.0 * jax.random.normal(jax.random.PRNGKey(7), (300,))
  logits = logits.at[::7].set(jnp.finfo(jnp.float32).min).at[1].set(-jnp.inf)
  draws = 200_000
  tokens = sample_categorical(jax.random.PRNGKey(8), jnp.broadcast_to(logits, (draws, 300)))
  counts = np.bincount(np.asarray(tokens), minlength=300)
  assert counts.shape == (300,)
  probs = np.asarray(jax.nn.softmax(logits))
  assert counts[::7].sum() == 0 and counts[1] == 0
  # Binomial standard error per token; 5 sigma over 300 tokens.
  sigma = np.sqrt(draws * probs * (1 - probs)) + 1.0
  assert (np.abs(counts - draws * probs) < 5 * sigma).all()


def test_filter_logits_top_k_and_top_p():
  logits = jnp.log(jnp.array([[0.5, 0.2, 0.15, 0.1, 0.05]]))
  kept = lambda x: np.asarray(x[0] > jnp.finfo(jnp.float32).min)  # noqa: E731
  np.testing.assert_array_equal(kept(filter_logits(logits, top_k=2, top_p=1.0)),
                                [1, 1, 0, 0, 0])
  # Nucleus 0.8: 0.5 + 0.2 = 0.7 < 0.8, so the third token (mass before it 0.7) is kept.
  np.testing.assert_array_equal(kept(filter_logits(logits, top_k=0, top_p=0.8)),
                                [1, 1, 1, 0, 0])
  np.testing.assert_array_equal(kept(filter_logits(logits, top_k=0, top_p=0.3)),
                                [1, 0, 0, 0, 0])


def test_bad_settings_raise():
  with pytest.raises(ValueError, match="top_p"):
    Sampler(CFG, max_new_tokens=4, stop_ids=(1,), pad_id=0, top_p=1.5)
  with pytest.raises(ValueError, match="num_kv_heads"):
    T.ModelConfig(vocab_size=8, num_layers=1, embed_dim=8, num_heads=3, num_kv_heads=2,
                  head_dim=4, mlp_dim=8)
  with pytest.raises(ValueError, match="float64"):
    T.ModelConfig(vocab_size=8, num_layers=1, embed_dim=8, num_heads=2, num_kv_heads=2,
                  head_dim=4, mlp_dim=8, dtype="float64")


def test_bfloat16_compute_tracks_float32(params, prompts):
  tokens, mask = prompts
  bf16 = CFG.__class__(**{**CFG.__dict__, "dtype": "bfloat16"})
  ref = np.asarray(T.logits(CFG, params, jnp.asarray(tokens), jnp.asarray(mask)))
  got = np.asarray(T.logits(bf16, params, jnp.asarray(tokens), jnp.asarray(mask)))
  assert got.dtype == np.float32  # logits are always projected with float32 accumulation
  err = np.abs(got - ref)[mask].max() / np.abs(ref)[mask].max()
  assert err < 0.05


def test_bfloat16_sampling_runs_and_tracks_float32(params, prompts):
  """The bf16 decode path compiles and runs on every backend (CPU included) and its
  sampler log-probs stay close to float32's on the same greedy tokens."""
  tokens, mask = prompts
  bf16 = CFG.__class__(**{**CFG.__dict__, "dtype": "bfloat16"})
  outs = [jax.device_get(Sampler(cfg, max_new_tokens=6, stop_ids=(EOS,), pad_id=0,
                                 temperature=0.0)(params, tokens, mask, jax.random.key(0)))
          for cfg in (CFG, bf16)]
  assert np.all(np.isfinite(outs[1].logprobs))
  same = outs[0].tokens == outs[1].tokens
  assert same.mean() > 0.5
  np.testing.assert_allclose(outs[1].logprobs[same], outs[0].logprobs[same], atol=0.1)


def _while_loops(jaxpr):
  """Every `while` equation of a closed jaxpr, nested ones included."""
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "while":
      yield eqn
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      yield from _while_loops(sub)


def test_decode_loop_reads_weights_in_the_compute_dtype(params, prompts):
  """float32 parameters with bfloat16 compute: the decode loop gets the weights cast once
  (no float32 weight enters a while loop) and the samples are those of weights cast by
  hand (the model casts at every use, so the values are the same)."""
  tokens, mask = prompts
  bf16 = CFG.__class__(**{**CFG.__dict__, "dtype": "bfloat16"})
  sampler = Sampler(bf16, max_new_tokens=6, stop_ids=(EOS,), pad_id=0, temperature=1.0)
  key = jax.random.key(3)
  jaxpr = jax.make_jaxpr(sampler.__call__)(params, tokens, mask, key)
  weight_shapes = {x.shape for x in jax.tree.leaves(params) if x.ndim >= 2}
  loops = list(_while_loops(jaxpr.jaxpr))
  assert loops
  carried = [v.aval for eqn in loops for v in eqn.invars if v.aval.shape in weight_shapes]
  assert {a.dtype for a in carried} == {jnp.dtype(jnp.bfloat16)}
  cast_by_hand = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
  assert jax.tree.all(jax.tree.map(lambda a, b: a.dtype == b.dtype,
                                   weights_for_decode(bf16, params), cast_by_hand))
  got, want = (jax.device_get(sampler(p, tokens, mask, key)) for p in (params, cast_by_hand))
  np.testing.assert_array_equal(got.tokens, want.tokens)
  np.testing.assert_array_equal(got.logprobs, want.logprobs)
  # Narrower parameters are never widened.
  assert jax.tree.all(jax.tree.map(lambda x: x.dtype == jnp.bfloat16,
                                   weights_for_decode(CFG, cast_by_hand)))


def test_unrolled_decode_layers_sample_as_the_scan_does(params, prompts):
  tokens, mask = prompts
  outs = [jax.device_get(jax.jit(Sampler(
      CFG, max_new_tokens=7, stop_ids=(EOS,), pad_id=0, temperature=1.0, num_samples=2,
      decode_block=4, decode_layers=kind).__call__)(params, tokens, mask, jax.random.key(5)))
          for kind in ("scan", "unrolled")]
  np.testing.assert_array_equal(outs[0].tokens, outs[1].tokens)
  np.testing.assert_allclose(outs[0].logprobs, outs[1].logprobs, atol=1e-5)
  np.testing.assert_array_equal(outs[0].lengths, outs[1].lengths)
  with pytest.raises(ValueError, match="decode_layers"):
    Sampler(CFG, max_new_tokens=2, stop_ids=(EOS,), pad_id=0, decode_layers="loop")


def test_positions_from_mask_count_real_tokens_only():
  mask = jnp.asarray([[False, False, True, True, True], [True] * 5, [False] * 5])
  positions = jax.jit(T.positions_from_mask)(mask)
  np.testing.assert_array_equal(positions, [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4], [0] * 5])
  assert positions.dtype == jnp.int32
