"""Attention kinds against the naive oracle (itself against float64 numpy); scanned layers."""

import dataclasses
import functools
import os

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from jax.sharding import PartitionSpec as P

from mopd_jax import sharding
from mopd_jax.models import attention as A
from mopd_jax.models import blockwise as blockwise_lib
from mopd_jax.models import transformer as T

B, T_LEN, H, K, D = 3, 21, 4, 2, 8


def _inputs(seed, t=T_LEN, s=T_LEN, b=B):
  ks = jax.random.split(jax.random.PRNGKey(seed), 3)
  q = jax.random.normal(ks[0], (b, t, H, D))
  k = jax.random.normal(ks[1], (b, s, K, D))
  v = jax.random.normal(ks[2], (b, s, K, D))
  return q, k, v


def _teacher_like_mask(s=T_LEN):
  """Left-padded prompts of different lengths, then responses right-padded after EOS."""
  index = np.arange(s)[None]
  start = np.array([[0], [6], [13]])  # left padding
  end = np.array([[s], [s - 4], [s - 1]])  # right padding
  return jnp.asarray((index >= start) & (index < end))


def _numpy_reference(q, k, v, mask):
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  g = q.shape[2] // k.shape[2]
  k, v = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)
  scores = np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(q.shape[-1])
  scores = np.where(np.asarray(mask)[:, None], scores, -np.inf)
  out = np.zeros(q.shape)
  for b in range(q.shape[0]):
    for h in range(q.shape[2]):
      for t in range(q.shape[1]):
        row = scores[b, h, t]
        if np.isfinite(row).any():
          p = np.exp(row - row.max())
          out[b, t, h] = (p / p.sum()) @ v[b, :, h]
  return out


def test_naive_matches_float64_numpy():
  q, k, v = _inputs(0)
  kv_mask = _teacher_like_mask()
  mask = A.dense_mask(kv_mask, T_LEN, causal=True)
  got = A.attention(q, k, v, kv_mask, kind="naive")
  np.testing.assert_allclose(got, _numpy_reference(q, k, v, mask), atol=2e-6)
  assert not np.asarray(got)[1, :6].any()  # left padding sees no key: zeros


def _loss_and_grads(kind, q, k, v, kv_mask, **kw):
  out_mask = kv_mask[:, :q.shape[1], None, None] if q.shape[1] == k.shape[1] else 1.0

  def loss(q, k, v):
    out = A.attention(q, k, v, kv_mask, kind=kind, **kw)
    return jnp.sum(jnp.sin(out) * out_mask), out

  (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
  return out, grads


@pytest.mark.parametrize("blocks", [(4, 8), (8, 5), (32, 32)])
def test_blockwise_matches_naive_values_and_gradients(blocks):
  q, k, v = _inputs(1)
  kv_mask = _teacher_like_mask()
  ref, ref_grads = _loss_and_grads("naive", q, k, v, kv_mask)
  got, grads = _loss_and_grads("blockwise", q, k, v, kv_mask, block_q=blocks[0],
                               block_k=blocks[1])
  np.testing.assert_allclose(got, ref, atol=1e-5)
  for name, a, b in zip("qkv", grads, ref_grads):
    assert np.abs(np.asarray(b)).max() > 1e-2, name  # the gradient is not trivially zero
    np.testing.assert_allclose(a, b, atol=2e-5, err_msg=name)


def test_blockwise_with_query_offset_and_without_causality():
  """Queries as the last 7 slots of 21 keys (chunked prefill), and a non-causal case."""
  q, k, v = _inputs(2, t=7)
  kv_mask = _teacher_like_mask()
  for causal in (True, False):
    ref, ref_grads = _loss_and_grads("naive", q, k, v, kv_mask, causal=causal, q_offset=14)
    got, grads = _loss_and_grads("blockwise", q, k, v, kv_mask, causal=causal, q_offset=14,
                                 block_q=4, block_k=4)
    np.testing.assert_allclose(got, ref, atol=1e-5)
    for a, b in zip(grads, ref_grads):
      np.testing.assert_allclose(a, b, atol=2e-5)


def test_blockwise_bfloat16_tracks_float32():
  q, k, v = _inputs(3)
  kv_mask = _teacher_like_mask()
  ref = A.attention(q, k, v, kv_mask, kind="naive")
  got = A.attention(*(x.astype(jnp.bfloat16) for x in (q, k, v)), kv_mask, kind="blockwise",
                    block_q=8, block_k=8)
  assert got.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(got, np.float32), ref, atol=5e-2)


def test_kind_errors_name_the_value():
  q, k, v = _inputs(0)
  mask = jnp.ones((B, T_LEN), bool)
  with pytest.raises(ValueError, match=r"'flash'.*'auto', 'naive', 'blockwise', 'cudnn'"):
    A.attention(q, k, v, mask, kind="flash")
  if jax.default_backend() != "gpu":
    with pytest.raises(ValueError, match=r"'cudnn' cannot run: it needs a GPU.*blockwise"):
      A.attention(q, k, v, mask, kind="cudnn")
    assert A.resolve_kind("auto", q, k) == "blockwise"
  if jax.default_backend() != "tpu":
    with pytest.raises(ValueError, match=r"config.model.attention='splash' cannot run: it "
                       r"needs a TPU.*'blockwise'.*'splash_interpret'"):
      A.attention(q, k, v, mask, kind="splash")
  with pytest.raises(ValueError, match=r"q_offset as a Python int"):
    jax.jit(lambda o: A.attention(q, k, v, mask, kind="splash_interpret", q_offset=o))(0)
  with pytest.raises(ValueError, match=r"model.attention 'flash'.*allowed"):
    T.ModelConfig(vocab_size=8, num_layers=1, embed_dim=8, num_heads=2, num_kv_heads=2,
                  head_dim=4, mlp_dim=8, attention="flash")
  with pytest.raises(ValueError, match=r"model.matmul_precision 'fp32'.*'highest'"):
    T.ModelConfig(vocab_size=8, num_layers=1, embed_dim=8, num_heads=2, num_kv_heads=2,
                  head_dim=4, mlp_dim=8, matmul_precision="fp32")
  with pytest.raises(ValueError, match=r"model.remat_policy 'some'.*dots_saveable"):
    T.ModelConfig(vocab_size=8, num_layers=1, embed_dim=8, num_heads=2, num_kv_heads=2,
                  head_dim=4, mlp_dim=8, remat_policy="some")


def test_splash_resolution_on_tpu_and_gpu(monkeypatch):
  """Which kind `auto` means and what `splash` refuses, with the backend's name faked."""
  q, k, _ = _inputs(0)
  highest = jax.lax.Precision.HIGHEST
  monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
  assert A.resolve_kind("auto", q, k) == "splash"
  assert A.resolve_kind("auto", q, k, highest) == "blockwise"  # logged
  assert A.resolve_kind("auto", q.astype(jnp.bfloat16), k, highest) == "splash"
  with pytest.raises(ValueError, match=r"'splash' cannot run: its kernels take no matmul "
                     r"precision.*matmul_precision.*'blockwise', 'splash'"):
    A.resolve_kind("splash", q, k, highest)
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  with pytest.raises(ValueError, match=r"'splash' cannot run: it needs a TPU backend, and "
                     r"this one is 'gpu'.*'cudnn', 'splash_interpret'"):
    A.resolve_kind("splash", q, k)


# --------------------------------------------------------------- Splash, interpreted.
# The Pallas interpreter is slow: few, small calls. Splash blocks are 128 wide.


def _long_teacher_mask(s=150):
  """Teacher rows: a prompt with peer context longer than the student's, past one block;
  row 1's left padding fills its whole first block (queries that see no key, and a key
  block of pure padding)."""
  index = np.arange(s)[None]
  return jnp.asarray((index >= np.array([[4], [131]])) & (index < np.array([[s - 9], [s]])))


@pytest.mark.parametrize("case", ["student", "teacher", "offset", "non_causal"])
def test_splash_interpret_matches_naive_and_float64(case):
  """Left and right padding, GQA (4 query heads over 2), several blocks, chunked prefill
  (queries in the last 7 of 21 slots), non-causal."""
  t, s, rows, kw = T_LEN, T_LEN, B, {}
  kv_mask = _teacher_like_mask()
  if case == "teacher":
    t = s = 150
    rows, kv_mask = 2, _long_teacher_mask()
  elif case == "offset":
    t, kw = 7, {"q_offset": 14}
  elif case == "non_causal":
    kw = {"causal": False}
  q, k, v = _inputs(5, t, s, rows)
  ref, ref_grads = _loss_and_grads("naive", q, k, v, kv_mask, **kw)
  got, grads = _loss_and_grads("splash_interpret", q, k, v, kv_mask, **kw)
  dense = A.dense_mask(kv_mask, t, kw.get("causal", True), kw.get("q_offset", 0))
  np.testing.assert_allclose(got, _numpy_reference(q, k, v, dense), atol=1e-5)
  np.testing.assert_allclose(got, ref, atol=1e-5)
  for name, a, b in zip("qkv", grads, ref_grads):
    assert np.abs(np.asarray(b)).max() > 1e-2, name
    np.testing.assert_allclose(a, b, atol=2e-5, err_msg=name)


# ------------------------------------------------------------------------- Packed rows.

# Three packed rows of 21 slots: several sequences each (ids rise along the row), padding
# (0) at the end; row 2 holds one sequence only.
_SEGMENT_LENGTHS = ([5, 9, 4], [1, 12, 3, 2], [21])


def _segment_ids(lengths=_SEGMENT_LENGTHS, t=T_LEN):
  seg = np.zeros((len(lengths), t), np.int32)
  for row, runs in enumerate(lengths):
    start = 0
    for index, n in enumerate(runs):
      seg[row, start:start + n] = index + 1
      start += n
  return jnp.asarray(seg)


def _numpy_segments_reference(q, k, v, lengths=_SEGMENT_LENGTHS):
  """Each segment attended as a sequence of its own (causal, float64); padding zeros."""
  out = np.zeros(q.shape)
  for row, runs in enumerate(lengths):
    start = 0
    for n in runs:
      part = slice(start, start + n)
      causal = np.tril(np.ones((n, n), bool))[None]
      out[row:row + 1, part] = _numpy_reference(q[row:row + 1, part], k[row:row + 1, part],
                                                v[row:row + 1, part], causal)
      start += n
  return out


def _segment_loss_and_grads(kind, q, k, v, segment_ids, **kw):
  real = (segment_ids != 0)[:, :, None, None]

  def loss(q, k, v):
    out = A.attention(q, k, v, None, kind=kind, segment_ids=segment_ids, **kw)
    return jnp.sum(jnp.sin(out) * real), out

  (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
  return out, grads


@pytest.mark.parametrize("kind, kw", [("blockwise", {"block_q": 4, "block_k": 8}),
                                      ("blockwise", {"block_q": 8, "block_k": 3}),
                                      ("splash_interpret", {})])
def test_segments_attend_only_their_own_sequence(kind, kw):
  """A packed row equals its sequences attended one by one (float64 numpy, by segment);
  blockwise and splash give the naive kind's values and gradients."""
  q, k, v = _inputs(6)
  seg = _segment_ids()
  ref, ref_grads = _segment_loss_and_grads("naive", q, k, v, seg)
  np.testing.assert_allclose(ref, _numpy_segments_reference(q, k, v), atol=2e-6)
  assert not np.asarray(ref)[1, 18:].any()  # padding sees no key: zeros
  got, grads = _segment_loss_and_grads(kind, q, k, v, seg, **kw)
  np.testing.assert_allclose(got, ref, atol=1e-5)
  for name, a, b in zip("qkv", grads, ref_grads):
    assert np.abs(np.asarray(b)).max() > 1e-2, name
    np.testing.assert_allclose(a, b, atol=2e-5, err_msg=name)


def test_segment_block_skipping_counts_segments_not_rows():
  """Blocks whose segment ranges do not meet are skipped: 4 segments of 8 in a row of 32
  with blocks of 8 need 4 (diagonal) block pairs, not the causal triangle's 10."""
  seg = jnp.asarray(np.repeat(np.arange(1, 5), 8)[None], jnp.int32)
  q_range, kv_range = blockwise_lib._segment_ranges(seg, 8), blockwise_lib._segment_ranges(seg, 8)
  needed = [bool(blockwise_lib._block_needed(True, 0, i, j, 8, 8, q_range, kv_range))
            for i in range(4) for j in range(4)]
  assert sum(needed) == 4
  ones = jnp.ones((1, 32), jnp.int32)
  q_range = kv_range = blockwise_lib._segment_ranges(ones, 8)
  assert sum(bool(blockwise_lib._block_needed(True, 0, i, j, 8, 8, q_range, kv_range))
             for i in range(4) for j in range(4)) == 10


def test_segment_ids_errors_name_the_problem():
  q, k, v = _inputs(0)
  with pytest.raises(ValueError, match=r"segment_ids must be \[B, T\] = \(3, 21\).*\(3, 20\)"):
    A.attention(q, k, v, None, kind="naive", segment_ids=jnp.ones((3, 20), jnp.int32))
  with pytest.raises(ValueError, match=r"need q_offset = 0, got 2"):
    A.attention(q, k, v, None, kind="naive", segment_ids=_segment_ids(), q_offset=2)


# ------------------------------------------------------------------------- In the model.

CFG = T.ModelConfig(vocab_size=53, num_layers=2, embed_dim=32, num_heads=4, num_kv_heads=2,
                    head_dim=8, mlp_dim=48, qk_norm=True, attention="naive",
                    remat_policy="none")


@pytest.fixture(scope="module")
def params():
  return T.init_params(CFG, jax.random.PRNGKey(0))


def _model_loss(cfg):
  tokens = jax.random.randint(jax.random.PRNGKey(4), (B, T_LEN), 0, CFG.vocab_size)
  mask = _teacher_like_mask()

  def loss(p):
    logits = T.logits(cfg, p, tokens, mask)
    return jnp.sum(jax.nn.log_softmax(logits)[..., 0] * mask), logits

  return jax.jit(jax.value_and_grad(loss, has_aux=True))


def test_model_kinds_and_remat_policies_agree(params):
  (_, ref), ref_grads = _model_loss(CFG)(params)
  for attention, policy in (("blockwise", "full"), ("auto", "dots_saveable"),
                            ("naive", "nothing_saveable")):
    cfg = dataclasses.replace(CFG, attention=attention, remat_policy=policy)
    (_, got), grads = _model_loss(cfg)(params)
    mask = np.asarray(_teacher_like_mask())
    np.testing.assert_allclose(np.asarray(got)[mask], np.asarray(ref)[mask], atol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), grads, ref_grads)


def test_model_logits_with_splash_interpret_equal_naive(params):
  """Under a (one-device) mesh and axis rules, so the kernel runs inside its shard_map."""
  tokens = jax.random.randint(jax.random.PRNGKey(6), (B, T_LEN), 0, CFG.vocab_size)
  mask = _teacher_like_mask()
  ref = jax.jit(functools.partial(T.logits, CFG))(params, tokens, mask)
  fn = jax.jit(functools.partial(T.logits, dataclasses.replace(
      CFG, attention="splash_interpret", axis_rules=sharding.DEFAULT_RULES)))
  with jax.set_mesh(sharding.make_mesh((1, 1, -1), jax.devices()[:1])):
    assert "shard_map" in str(jax.make_jaxpr(fn)(params, tokens, mask))
    got = fn(params, tokens, mask)
  np.testing.assert_allclose(np.asarray(got)[mask], np.asarray(ref)[mask], atol=1e-5)


def test_dense_mask_equals_token_mask(params):
  tokens = jax.random.randint(jax.random.PRNGKey(5), (B, T_LEN), 0, CFG.vocab_size)
  mask = _teacher_like_mask()
  positions = T.positions_from_mask(mask)
  cfg = dataclasses.replace(CFG, attention="blockwise")
  dense, _ = T.hidden_states(cfg, params, tokens, positions, T.causal_mask(mask))
  token, _ = T.hidden_states(cfg, params, tokens, positions, mask)
  np.testing.assert_allclose(np.asarray(dense)[mask], np.asarray(token)[mask], atol=1e-5)


def _dot_precisions(jaxpr):
  """The `precision` of every dot_general in a jaxpr, sub-jaxprs (scan, remat) included."""
  found = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      found.append(eqn.params["precision"])
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      found += _dot_precisions(sub)
  return found


def _count_eqns(jaxpr):
  return sum(1 + sum(_count_eqns(sub) for sub in jax.extend.core.jaxprs_in_params(e.params))
             for e in jaxpr.eqns)


def test_matmul_precision_reaches_every_matmul(params):
  tokens, mask = jnp.ones((1, 4), jnp.int32), jnp.ones((1, 4), bool)
  highest = (jax.lax.Precision.HIGHEST, jax.lax.Precision.HIGHEST)
  for name in ("highest", "default"):
    cfg = dataclasses.replace(CFG, matmul_precision=name, attention="blockwise")
    grad = jax.grad(lambda p, c=cfg: T.logits(c, p, tokens, mask).sum())
    found = _dot_precisions(jax.make_jaxpr(grad)(params).jaxpr)
    assert len(found) >= 20  # forward and backward of projections, attention, MLP, head
    assert all((p == highest) if name == "highest" else p is None for p in found), found


def test_layers_are_scanned_so_the_program_does_not_grow_with_depth(params):
  tokens, mask = jnp.ones((1, 4), jnp.int32), jnp.ones((1, 4), bool)

  def size(layers):
    cfg = dataclasses.replace(CFG, num_layers=layers, remat_policy="full")
    p = jax.eval_shape(lambda: T.init_params(cfg, jax.random.PRNGKey(0)))
    grad = jax.grad(lambda p: T.logits(cfg, p, tokens, mask).sum())
    return _count_eqns(jax.make_jaxpr(grad)(p).jaxpr)

  assert size(2) == size(12)
  assert params["layers"]["attn"]["q_proj"]["kernel"].shape == (2, 32, 4, 8)
  axes = T.param_logical_axes(CFG)
  assert tuple(axes["layers"]["mlp"]["up_proj"]["kernel"]) == ("layers", "embed", "mlp")


def test_activation_constraints_follow_the_config_rules(params, monkeypatch):
  tokens, mask = jnp.ones((1, 4), jnp.int32), jnp.ones((1, 4), bool)
  ruled = dataclasses.replace(CFG, axis_rules=sharding.DEFAULT_RULES)

  def count(cfg):
    fn = jax.jit(lambda p: T.logits(cfg, p, tokens, mask))
    return str(fn.trace(params).jaxpr).count("sharding_constraint")

  assert count(CFG) == 0  # no rules: no constraints, with or without a mesh
  with jax.set_mesh(sharding.make_mesh((1, 1, -1), jax.devices()[:1])):
    assert count(CFG) == 0
    # Embedding, per layer (inside the scan, counted once): q, k, v, attention output, MLP
    # hidden, residual; logits.
    assert count(ruled) == 8
  # With one device nothing can be lost, and eager calls work without a mesh.
  assert count(ruled) == 0
  # Rules without a context mesh where there are several devices: an error, not
  # constraints that silently vanish.
  monkeypatch.setattr(sharding, "_one_device", lambda: False)
  with pytest.raises(ValueError, match=r"embedded tokens .* without a context mesh"):
    count(ruled)


def test_constraints_are_in_the_jit_cache_key(params):
  """One jitted function of the config: configs that differ only in their rules trace
  separately, and each one's constraints follow its own rules."""
  tokens, mask = jnp.ones((2, 4), jnp.int32), jnp.ones((2, 4), bool)
  fn = jax.jit(T.logits, static_argnums=0)
  other = tuple((n, None) if n == "activation_batch" else (n, a)
                for n, a in sharding.DEFAULT_RULES)
  with jax.set_mesh(sharding.make_mesh((1, 1, -1), jax.devices()[:1])):
    texts = [fn.trace(dataclasses.replace(CFG, axis_rules=r), params, tokens,
                      mask).jaxpr.pretty_print() for r in (sharding.DEFAULT_RULES, other)]
  assert "('data', 'fsdp')" in texts[0] and "('data', 'fsdp')" not in texts[1]


def test_kv_heads_that_do_not_divide_stay_replicated_and_are_counted():
  rules = sharding.DEFAULT_RULES
  mesh = jax.sharding.AbstractMesh((1, 1, 4), sharding.MESH_AXES)
  with jax.sharding.use_abstract_mesh(mesh):
    sharding.REPLICATED.clear()
    spec = sharding.logical_spec((8, 5, 2, 16), T.ACT_KV_HEADS, rules, "attention keys")
    assert spec == P(("data", "fsdp"), None, None, None)
    assert sharding.REPLICATED[("activation_kv_heads", 2, ("tensor",), 4)] == 1
    # Query heads are not meant to stay replicated: an error naming array, axis and sizes.
    with pytest.raises(ValueError, match=r"attention queries of shape \(8, 5, 2, 16\): "
                       r"logical axis 'activation_heads' \(size 2\) cannot be split over "
                       r"mesh axes \('tensor',\) of size 4"):
      sharding.logical_spec((8, 5, 2, 16), T.ACT_HEADS, rules, "attention queries")


def test_a_mesh_of_several_devices_needs_rules():
  mesh = jax.sharding.AbstractMesh((1, 2, 2), sharding.MESH_AXES)
  with jax.sharding.use_abstract_mesh(mesh), pytest.raises(ValueError,
                                                          match=r"without axis rules"):
    sharding.logical_spec((4, 3), ("activation_batch", None), None, "logits")


def test_kind_the_backend_lacks_stops_the_run_before_the_model_loads(monkeypatch, tmp_path):
  from mopd_jax import settings, train  # pylint: disable=import-outside-toplevel
  from tests.conftest import load_config  # pylint: disable=import-outside-toplevel
  A.check_backend("splash_interpret", "cpu")
  with pytest.raises(ValueError, match=r"'cudnn' needs a GPU backend.*'blockwise'"):
    A.check_backend("cudnn", "cpu")
  # The model directory is empty: the run must stop on the attention kind first.
  config = load_config(**{"model.attention": "splash", "model.cache_dir": str(tmp_path)})
  with pytest.raises(settings.ConfigError, match=r"'splash' needs a TPU backend, and this "
                     r"one is 'cpu'"):
    train.setup(config)
  assert not os.listdir(tmp_path)
  A.check_backend("splash", "tpu")
  # The platform is the one given (the mesh's devices), not the process's backend.
  monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
  with pytest.raises(ValueError, match=r"'splash' needs a TPU backend, and this one is 'gpu'"):
    A.check_backend("splash", "gpu")


def test_blockwise_memory_inside_a_differentiated_scan():
  """The scanned layers differentiate attention inside lax.scan, where JAX hoists what
  does not depend on the carry out of the loop; the per-block masks and fill values must
  not be stacked over every (query block, key block) pair."""
  t, block = 1024, 128  # 8 x 8 block pairs
  q = jnp.zeros((1, t, 2, 8), jnp.float32)
  k = jnp.zeros((1, t, 1, 8), jnp.float32)
  mask = jnp.ones((1, t), bool)

  def attend(x):
    return A.attention(x, k, k, mask, kind="blockwise", block_q=block, block_k=block)

  def plain(x):
    return attend(x).sum()

  def scanned(x):
    return jax.lax.scan(lambda c, _: (attend(c), None), x, None, length=1)[0].sum()

  temp = {f.__name__: jax.jit(jax.grad(f)).lower(q).compile().memory_analysis()
          .temp_size_in_bytes for f in (plain, scanned)}
  stacked_scores = 8 * 8 * 2 * block * block * 4  # one float32 [nq, nk, H, bq, bk]
  assert temp["scanned"] < temp["plain"] + stacked_scores // 4, temp
