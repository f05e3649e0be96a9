"""Dot-product attention behind one function, with interchangeable implementations.

`attention(q, k, v, kv_mask, kind=...)` computes grouped-query attention of queries
q [B, T, H, D] over keys/values k, v [B, S, K, D] (H a multiple of K). Masking is given
without a dense [B, T, S] array:
- `kv_mask` bool [B, S]: True on real keys (False on padding, left or right);
- `q_offset`: query t sits at key slot `q_offset + t`; with `causal=True` it attends to
  key slots <= its own. A full forward has q_offset = 0 and T = S.
- `segment_ids` int32 [B, T] (packed rows, T == S, q_offset 0): several sequences share a
  row, each a run of one positive id; a query attends only keys of its own segment (and,
  with `causal`, at slots <= its own), id 0 is padding. It replaces `kv_mask` (whose
  value must then be `segment_ids != 0`). Positions (RoPE) restart per segment in the
  caller (`mopd_jax.packing`).
Each kind builds its own mask from these per block. Query rows that see no key at all (a
left-padded row's padding, a packed row's tail) return zeros.

Kinds:
- `naive`: materialises float32 scores [B, H, T, S] (2*B*H*T*S*D FLOPs per matmul,
  4*B*H*T*S bytes of scores); the test oracle.
- `blockwise`: flash-style attention in pure JAX. Online softmax over key blocks inside a
  `lax.scan`, query blocks in an outer scan, and a custom VJP that recomputes each block's
  probabilities from the saved log-sum-exp, so neither pass holds more than one
  [B, H, block_q, block_k] score block. Blocks wholly above the causal diagonal or wholly
  padding are skipped with `lax.cond`; with segment ids, so are blocks whose query and key
  segment ranges do not meet, so a packed row costs about the sum of its segments'
  squares, not its length's. The portable default.
- `cudnn`: `jax.nn.dot_product_attention(implementation="cudnn")` on GPU, for bfloat16 /
  float16 inputs with head_dim <= 128 and a multiple of 8. Each row is shifted so that its
  real tokens start at slot 0 (cuDNN takes right-padded lengths), which needs every row's
  real tokens to be one contiguous run and T == S. With segment ids (packed rows) no shift
  is needed; they go to cuDNN as the public API's dense boolean `mask` [B, 1, T, T] (one
  per call: O(B T^2) bytes, so for long packed rows `blockwise` may use less memory), and
  `auto` then picks `blockwise` rather than build it. Not run on a GPU yet.
- `splash`: the Pallas splash-attention kernels of `jax.experimental.pallas.ops.tpu` on TPU,
  fused in both passes (a forward kernel, and dq / dk+dv kernels in its own custom VJP).
  Padding is expressed as segment ids (real keys segment 1, padding keys 0, every query 1),
  and packed rows pass theirs straight to the kernels' `SegmentIds`; the causal mask is
  static, so q_offset must be a Python int. GQA is native: query head h
  reads key/value head h // (H / K), nothing is repeated in memory. Lengths are padded up to
  the blocks, which are multiples of 128 (TPU lanes). The kernels take no matmul precision,
  so float32 inputs with a matmul precision other than the default are refused.
- `splash_interpret`: the same kernels run by the Pallas interpreter (slow; for tests on
  CPU, the backend it is tested on). Only an explicit setting selects it.
- `auto`: `splash` on TPU, `cudnn` on GPU where it applies, otherwise `blockwise`; logs when
  a TPU or GPU run falls back.

"This backend" is the platform the traced code is compiled for (`target_platform`): the
devices of the context mesh (`jax.set_mesh`, which `sharding.UnderMesh` sets), else the
process's default backend. A CPU host compiling for TPU devices (ahead of time, for a named
topology) therefore gets the TPU choices. A kind that cannot run on that platform or these
inputs raises an error that names `config.model.attention`, the value and the kinds that
run there.

`decode_attention` is the sampler's one-token step over a prompt cache shared by the G
samples of each prompt plus the written blocks of a per-sample response cache.
"""

from __future__ import annotations

import functools
import operator

from absl import logging
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from mopd_jax import sharding
from mopd_jax.choices import ATTENTION_KINDS as KINDS

PRECISIONS = {  # keys: choices.MATMUL_PRECISIONS
    "default": None,
    "high": jax.lax.Precision.HIGH,
    "highest": jax.lax.Precision.HIGHEST,
}
DEFAULT_BLOCK = 512
SPLASH_LANES = 128  # splash's blocks are whole multiples of the TPU lane width
# Logical axes of q [B, T, H, D] and k, v [B, S, K, D], as the model constrains them.
_Q_AXES = ("activation_batch", "activation_length", "activation_heads", "activation_kv")
_KV_AXES = ("activation_batch", "activation_length", "activation_kv_heads", "activation_kv")


def check_kind(kind: str) -> None:
  if kind not in KINDS:
    raise ValueError(f"Unknown attention kind {kind!r}; allowed: {list(KINDS)}.")


def target_platform() -> str:
  """The platform ('cpu', 'gpu', 'tpu') of the context mesh's devices, else the default one."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.abstract_device is None:
    return jax.default_backend()
  return mesh.abstract_device.platform


def _cudnn_unsupported_reason(q, k) -> str | None:
  """Why cuDNN flash attention cannot run these inputs here, or None when it can."""
  if target_platform() != "gpu":
    return f"it needs a GPU backend, and this one is {target_platform()!r}"
  if q.dtype not in (jnp.bfloat16, jnp.float16):
    return f"it needs bfloat16 or float16 inputs, got {q.dtype}"
  if q.shape[-1] > 128 or q.shape[-1] % 8:
    return f"it needs head_dim <= 128 and a multiple of 8, got {q.shape[-1]}"
  if q.shape[1] != k.shape[1]:
    return f"it needs as many queries as keys here, got {q.shape[1]} and {k.shape[1]}"
  return None


def _splash_unsupported_reason(q, precision) -> str | None:
  """Why the splash kernels cannot run these inputs here, or None when they can."""
  if target_platform() != "tpu":
    return f"it needs a TPU backend, and this one is {target_platform()!r}"
  if precision is not None and q.dtype == jnp.float32:
    return (f"its kernels take no matmul precision, and float32 inputs ask for {precision} "
            f"(config.model.matmul_precision)")
  return None


def _kinds_that_run(backend: str) -> list[str]:
  return (["auto", "naive", "blockwise"] + ["cudnn"] * (backend == "gpu")
          + ["splash"] * (backend == "tpu") + ["splash_interpret"])


def check_backend(kind: str, platform: str) -> None:
  """Raises ValueError, naming the kinds that run there, when `kind` needs another platform.

  `platform` is that of the devices the run compiles for (`device.platform`). Called at
  start-up, so that a run with a kind that platform lacks stops before building the model
  and the data (the shape and dtype checks of `resolve_kind` come at tracing).
  """
  check_kind(kind)
  if kind not in _kinds_that_run(platform):
    needs = {"cudnn": "a GPU", "splash": "a TPU"}[kind]
    raise ValueError(
        f"config.model.attention={kind!r} needs {needs} backend, and this one is "
        f"{platform!r}. Kinds that run there: {_kinds_that_run(platform)}.")


def resolve_kind(kind: str, q, k, precision=None, *, segments=False) -> str:
  """The implementation that `kind` means for these inputs on this backend.

  segments: the inputs are packed rows with segment ids; `auto` then avoids cuDNN, which
  would need a dense [B, 1, T, T] mask.
  """
  check_kind(kind)
  reason = None
  if kind == "cudnn":
    reason = _cudnn_unsupported_reason(q, k)
  elif kind == "splash":
    reason = _splash_unsupported_reason(q, precision)
  if reason is not None:
    raise ValueError(
        f"config.model.attention={kind!r} cannot run: {reason}. Kinds that run here: "
        f"{_kinds_that_run(target_platform())} ('splash_interpret' is the splash kernel in "
        f"the slow Pallas interpreter, for tests).")
  if kind != "auto":
    return kind
  if target_platform() == "tpu":
    reason = _splash_unsupported_reason(q, precision)
    if reason is None:
      return "splash"
    logging.info("attention='auto' uses blockwise instead of splash: %s.", reason)
    return "blockwise"
  reason = _cudnn_unsupported_reason(q, k)
  if reason is None and segments:
    reason = "packed rows would need a dense [B, 1, T, T] mask"
  if reason is None:
    return "cudnn"
  if target_platform() == "gpu":
    logging.info("attention='auto' uses blockwise instead of cudnn: %s.", reason)
  return "blockwise"


def attention(q, k, v, kv_mask, *, kind="auto", causal=True, q_offset=0,
              block_q=DEFAULT_BLOCK, block_k=DEFAULT_BLOCK, precision=None,
              segment_ids=None, rules=None):
  """Grouped-query attention; returns [B, T, H, D] in q.dtype (see the module docstring).

  segment_ids: None, or int32 [B, T] of packed rows (then kv_mask may be None).
  rules: the model's logical axis rules (`ModelConfig.axis_rules`); splash runs in a
  `shard_map` by them on the context mesh.
  """
  if q.shape[2] % k.shape[2]:
    raise ValueError(f"query heads ({q.shape[2]}) must be a multiple of key/value heads "
                     f"({k.shape[2]}).")
  if segment_ids is not None:
    _check_segments(q, k, segment_ids, q_offset)
    kv_mask = segment_ids != 0
  kind = resolve_kind(kind, q, k, precision, segments=segment_ids is not None)
  kv_mask = kv_mask.astype(bool)
  if kind in ("splash", "splash_interpret"):
    return splash(q, k, v, kv_mask, q_offset, causal=causal, block_q=block_q,
                  block_k=block_k, interpret=kind == "splash_interpret",
                  segment_ids=segment_ids, rules=rules)
  q_offset = jnp.asarray(q_offset, jnp.int32)
  if kind == "naive":
    mask = (dense_mask(kv_mask, q.shape[1], causal, q_offset) if segment_ids is None
            else segment_mask(segment_ids, causal))
    return naive(q, k, v, mask, precision=precision)
  if kind == "blockwise":
    return blockwise(q, k, v, kv_mask, q_offset, causal=causal, block_q=block_q,
                     block_k=block_k, precision=precision, segment_ids=segment_ids)
  return _cudnn(q, k, v, kv_mask, causal=causal, segment_ids=segment_ids)


def _check_segments(q, k, segment_ids, q_offset):
  """Packed rows: queries and keys are the same T slots of each row."""
  b, t = q.shape[:2]
  if tuple(segment_ids.shape) != (b, t) or k.shape[1] != t:
    raise ValueError(f"segment_ids must be [B, T] = {(b, t)} with as many keys as queries, "
                     f"got segment_ids {tuple(segment_ids.shape)} and {k.shape[1]} keys.")
  if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
    raise ValueError(f"segment_ids must be integers, got dtype {segment_ids.dtype}.")
  if not isinstance(q_offset, int) or q_offset:
    raise ValueError(f"segment_ids (packed rows) need q_offset = 0, got {q_offset!r}.")


def segment_mask(segment_ids, causal):
  """bool [B, T, T]: query t attends key s of its own (non-zero) segment (`naive` only)."""
  seg = segment_ids
  mask = (seg[:, :, None] == seg[:, None, :]) & (seg[:, None, :] != 0)
  if causal:
    mask = mask & jnp.tril(jnp.ones(mask.shape[1:], bool))[None]
  return mask


def dense_mask(kv_mask, num_queries, causal, q_offset=0):
  """bool [B, T, S]: query t attends key s (only for `naive`; O(B*T*S) bytes)."""
  mask = kv_mask[:, None, :]
  if causal:
    q_slot = q_offset + jnp.arange(num_queries)[:, None]
    mask = mask & (jnp.arange(kv_mask.shape[-1])[None, :] <= q_slot)[None]
  return mask


def naive(q, k, v, mask, *, precision=None):
  """Materialised attention under a dense bool mask [B, T, S]; the reference."""
  b, t, h, d = q.shape
  kh = k.shape[2]
  qg = q.reshape(b, t, kh, h // kh, d)
  scores = jnp.einsum("btkgd,bskd->bkgts", qg, k, precision=precision,
                      preferred_element_type=jnp.float32) * (d ** -0.5)
  mask = mask[:, None, None]
  scores = jnp.where(mask, scores, -jnp.inf)
  row_max = jnp.max(scores, axis=-1, keepdims=True)
  probs = jnp.exp(scores - jnp.where(jnp.isfinite(row_max), row_max, 0.0))
  denom = jnp.sum(probs, axis=-1, keepdims=True)
  probs = probs / jnp.where(denom > 0, denom, 1.0)
  out = jnp.einsum("bkgts,bskd->btkgd", probs.astype(v.dtype), v, precision=precision,
                   preferred_element_type=jnp.float32)
  return out.reshape(b, t, h, d).astype(q.dtype)


# ---------------------------------------------------------------------------------------
# Blockwise (flash-style) attention with a custom VJP.
# Internal layout: q [B, K, G, T, D] (pre-scaled by 1/sqrt(D)), k/v [B, S, K, D].


def _pad_to(x, axis, multiple, value=0):
  pad = -x.shape[axis] % multiple
  if not pad:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, pad)
  return jnp.pad(x, widths, constant_values=value)


def blockwise(q, k, v, kv_mask, q_offset=0, *, causal=True, block_q=DEFAULT_BLOCK,
              block_k=DEFAULT_BLOCK, precision=None, segment_ids=None):
  """Flash-style attention; same contract as `attention(kind='blockwise')`.

  Cost: the forward does the 4*B*H*T*S*D FLOPs of the two matmuls (less the skipped
  blocks) and the backward recomputes the scores once (10*B*H*T*S*D in all). Memory beyond
  inputs and outputs: one [B, H, block_q, block_k] float32 block, plus the float32
  log-sum-exp [B, H, T] saved for the backward.

  Masks are built from segment ids on both sides: query t attends key s iff
  q_seg[t] == kv_seg[s] != 0 (and s <= q_offset + t when causal). Without `segment_ids`
  every query is in segment 1 and a key in 1 if real, 0 if padding, which is the kv_mask.
  """
  b, t, h, d = q.shape
  s, kh = k.shape[1], k.shape[2]
  bq, bk = min(block_q, t), min(block_k, s)
  qg = q.reshape(b, t, kh, h // kh, d).transpose(0, 2, 3, 1, 4) * jnp.asarray(
      d ** -0.5, q.dtype)
  qg = _pad_to(qg, 3, bq)
  k, v = _pad_to(k, 1, bk), _pad_to(v, 1, bk)
  if segment_ids is None:
    q_seg = jnp.ones((b, t), jnp.int32)
    kv_seg = kv_mask.astype(jnp.int32)
  else:
    q_seg = kv_seg = segment_ids.astype(jnp.int32)
  # Padded query slots get -1 (they match no key, not even padding keys in segment 0).
  q_seg = _pad_to(q_seg, 1, bq, -1)
  kv_seg = _pad_to(kv_seg, 1, bk, 0)
  out = _flash(causal, bq, bk, precision, qg, k, v, q_seg, kv_seg,
               jnp.asarray(q_offset, jnp.int32))
  return out[:, :, :, :t].transpose(0, 3, 1, 2, 4).reshape(b, t, h, d)


_NO_SEGMENT = jnp.iinfo(jnp.int32).max


def _segment_ranges(seg, block):
  """Per row and block of `seg` [B, L]: (lowest, highest) positive segment id, int32
  [B, L / block] each; a block without one gets (int32 max, 0), an empty range."""
  blocks = seg.reshape(seg.shape[0], -1, block)
  real = blocks > 0
  lo = jnp.min(jnp.where(real, blocks, _NO_SEGMENT), axis=-1)
  hi = jnp.max(jnp.where(real, blocks, 0), axis=-1)
  return lo, hi


def _block_needed(causal, q_offset, i, j, bq, bk, q_range, kv_range):
  """Whether key block j can be seen by any query of query block i: in some row, the
  blocks' segment ranges meet (a key of a query's segment may lie there), and with
  `causal` the key block does not lie wholly above the diagonal."""
  (q_lo, q_hi), (kv_lo, kv_hi) = q_range, kv_range
  meet = jnp.any((kv_lo[:, j] <= q_hi[:, i]) & (q_lo[:, i] <= kv_hi[:, j]))
  if not causal:
    return meet
  return meet & (j * bk <= q_offset + i * bq + bq - 1)


def _block_mask(causal, q_offset, i, j, bq, bk, q_seg_i, kv_seg_j):
  """bool [B, 1, 1, bq, bk] mask of one (query block, key block) pair."""
  mask = ((q_seg_i[:, :, None] == kv_seg_j[:, None, :])
          & (kv_seg_j[:, None, :] != 0))[:, None, None]
  if causal:
    q_slot = q_offset + i * bq + jnp.arange(bq)[:, None]
    k_slot = j * bk + jnp.arange(bk)[None, :]
    mask = mask & (k_slot <= q_slot)
  return mask


def _opaque(step):
  """`step` (one block pair's work) kept whole under partial evaluation.

  Inside a differentiated lax.scan (the scanned layers), JAX moves the part of a loop
  body that does not depend on the loop's carry ahead of the loop and keeps its values
  for every iteration: here the block masks and the broadcast fill values of every
  (query block, key block) pair, [nq, nk, B, H, bq, bk] -- the size of the [T, S]
  scores that blockwise attention exists to avoid. A checkpoint that saves nothing makes
  partial evaluation recompute them inside the step instead.
  """
  return jax.checkpoint(step, prevent_cse=False,
                        policy=jax.checkpoint_policies.nothing_saveable)


def _slice(x, axis, index, size):
  return jax.lax.dynamic_slice_in_dim(x, index * size, size, axis)


def _flash_forward(causal, bq, bk, precision, q, k, v, q_seg, kv_seg, q_offset):
  """(out [B, K, G, Tp, D] in q.dtype, lse float32 [B, K, G, Tp])."""
  b, kh, g, tp, d = q.shape
  nq, nk = tp // bq, k.shape[1] // bk
  q_range, kv_range = _segment_ranges(q_seg, bq), _segment_ranges(kv_seg, bk)

  def q_block(i):
    q_i, q_seg_i = _slice(q, 3, i, bq), _slice(q_seg, 1, i, bq)

    def k_step(carry, j):
      m, l, acc = carry
      k_j, v_j, kv_seg_j = (_slice(k, 1, j, bk), _slice(v, 1, j, bk),
                            _slice(kv_seg, 1, j, bk))

      def update(carry):
        m, l, acc = carry
        scores = jnp.einsum("bkgqd,bskd->bkgqs", q_i, k_j, precision=precision,
                            preferred_element_type=jnp.float32)
        scores = jnp.where(_block_mask(causal, q_offset, i, j, bq, bk, q_seg_i, kv_seg_j),
                           scores, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(scores, axis=-1))
        m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
        p = jnp.exp(scores - m_safe[..., None])
        corr = jnp.exp(m - m_safe)
        l = l * corr + jnp.sum(p, axis=-1)
        acc = acc * corr[..., None] + jnp.einsum(
            "bkgqs,bskd->bkgqd", p.astype(v.dtype), v_j, precision=precision,
            preferred_element_type=jnp.float32)
        return m_new, l, acc

      needed = _block_needed(causal, q_offset, i, j, bq, bk, q_range, kv_range)
      return _opaque(lambda c: jax.lax.cond(needed, update, lambda c: c, c))(carry), None

    init = (jnp.full((b, kh, g, bq), -jnp.inf, jnp.float32),
            jnp.zeros((b, kh, g, bq), jnp.float32),
            jnp.zeros((b, kh, g, bq, d), jnp.float32))
    (m, l, acc), _ = jax.lax.scan(k_step, init, jnp.arange(nk))
    seen = l > 0
    out = acc / jnp.where(seen, l, 1.0)[..., None]
    lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), 0.0)
    return out.astype(q.dtype), lse

  out, lse = jax.lax.map(q_block, jnp.arange(nq))  # [nq, B, K, G, bq, (D)]
  out = jnp.moveaxis(out, 0, 3).reshape(b, kh, g, tp, d)
  lse = jnp.moveaxis(lse, 0, 3).reshape(b, kh, g, tp)
  return out, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def _flash(causal, bq, bk, precision, q, k, v, q_seg, kv_seg, q_offset):
  return _flash_forward(causal, bq, bk, precision, q, k, v, q_seg, kv_seg, q_offset)[0]


def _flash_fwd(causal, bq, bk, precision, q, k, v, q_seg, kv_seg, q_offset):
  out, lse = _flash_forward(causal, bq, bk, precision, q, k, v, q_seg, kv_seg, q_offset)
  return out, (q, k, v, q_seg, kv_seg, q_offset, out, lse)


def _flash_bwd(causal, bq, bk, precision, residuals, d_out):
  q, k, v, q_seg, kv_seg, q_offset, out, lse = residuals
  b, kh, g, tp, d = q.shape
  nq, nk = tp // bq, k.shape[1] // bk
  q_range, kv_range = _segment_ranges(q_seg, bq), _segment_ranges(kv_seg, bk)
  delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)
  mm = functools.partial(jnp.einsum, precision=precision, preferred_element_type=jnp.float32)

  def k_block(dq, j):
    k_j, v_j, kv_seg_j = _slice(k, 1, j, bk), _slice(v, 1, j, bk), _slice(kv_seg, 1, j, bk)

    def q_step(carry, i):
      def grads(carry):
        dk, dv = carry
        q_i, do_i = _slice(q, 3, i, bq), _slice(d_out, 3, i, bq)
        lse_i, delta_i = _slice(lse, 3, i, bq), _slice(delta, 3, i, bq)
        scores = mm("bkgqd,bskd->bkgqs", q_i, k_j)
        mask = _block_mask(causal, q_offset, i, j, bq, bk, _slice(q_seg, 1, i, bq), kv_seg_j)
        p = jnp.where(mask, jnp.exp(scores - lse_i[..., None]), 0.0)
        dv = dv + mm("bkgqs,bkgqd->bskd", p.astype(do_i.dtype), do_i)
        dp = mm("bkgqd,bskd->bkgqs", do_i, v_j)
        ds = (p * (dp - delta_i[..., None])).astype(q.dtype)
        dk = dk + mm("bkgqs,bkgqd->bskd", ds, q_i)
        return (dk, dv), mm("bkgqs,bskd->bkgqd", ds, k_j)

      def skip(carry):
        return carry, jnp.zeros((b, kh, g, bq, d), jnp.float32)

      needed = _block_needed(causal, q_offset, i, j, bq, bk, q_range, kv_range)
      return _opaque(lambda c: jax.lax.cond(needed, grads, skip, c))(carry)

    init = (jnp.zeros((b, bk, kh, d), jnp.float32), jnp.zeros((b, bk, kh, d), jnp.float32))
    (dk, dv), dq_blocks = jax.lax.scan(q_step, init, jnp.arange(nq))
    dq = dq + jnp.moveaxis(dq_blocks, 0, 3).reshape(b, kh, g, tp, d)
    return dq, (dk, dv)

  dq, (dk, dv) = jax.lax.scan(k_block, jnp.zeros(q.shape, jnp.float32), jnp.arange(nk))
  dk = jnp.moveaxis(dk, 0, 1).reshape(k.shape)
  dv = jnp.moveaxis(dv, 0, 1).reshape(v.shape)
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


# ---------------------------------------------------------------------------------------
# cuDNN.


def _shift_rows(x, shift):
  """Rolls each row of x [B, L, ...] left by shift [B] (row b: out[t] = x[t + shift])."""
  length = x.shape[1]
  index = (jnp.arange(length)[None, :] + shift[:, None]) % length
  index = index.reshape(index.shape + (1,) * (x.ndim - 2))
  return jnp.take_along_axis(x, index, axis=1)


def _cudnn(q, k, v, kv_mask, *, causal, segment_ids=None):
  """cuDNN flash attention; rows' real tokens are moved to the front (right padding).

  Packed rows (segment_ids) go as they are, with the public API's dense boolean mask
  [B, 1, T, T]: a query sees the keys of its own segment, and a padding slot only itself
  (a fully masked query would leave cuDNN's softmax undefined); padding is zeroed after.
  """
  real = kv_mask[:, :, None, None]
  if segment_ids is not None:
    seg = segment_ids
    eye = jnp.eye(seg.shape[1], dtype=bool)[None]
    mask = (seg[:, :, None] == seg[:, None, :]) & ((seg[:, None, :] != 0) | eye)
    out = jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], is_causal=causal,
                                       implementation="cudnn")
    return jnp.where(real, out, 0).astype(q.dtype)
  first = jnp.argmax(kv_mask, axis=1).astype(jnp.int32)
  lengths = jnp.sum(kv_mask, axis=1, dtype=jnp.int32)
  q, k, v = (_shift_rows(x, first) for x in (q, k, v))
  out = jax.nn.dot_product_attention(
      q, k, v, is_causal=causal, query_seq_lengths=lengths, key_value_seq_lengths=lengths,
      implementation="cudnn")
  out = _shift_rows(out, -first)
  return jnp.where(real, out, 0).astype(q.dtype)


# ---------------------------------------------------------------------------------------
# Splash attention (Pallas, TPU).


def _lane_multiple(n):
  return -(-n // SPLASH_LANES) * SPLASH_LANES


def splash(q, k, v, kv_mask, q_offset=0, *, causal=True, block_q=DEFAULT_BLOCK,
           block_k=DEFAULT_BLOCK, interpret=False, segment_ids=None, rules=None):
  """Splash attention; same contract as `attention(kind='splash')`.

  Cost: the matmul FLOPs of `blockwise` over query and key lengths padded up to the
  blocks (block_q / block_k capped at the length, rounded up to multiples of 128). Blocks
  wholly above the causal diagonal are skipped; blocks of pure padding are not (segment ids
  are data, the block map is built from the static mask), where `blockwise` skips them.
  Memory beyond inputs and outputs: the padded, transposed copies of q, k, v and the
  float32 log-sum-exp saved for the backward.

  With axis rules (on the context mesh) the kernels run in a `shard_map` over the
  rows' mesh axes and, when query and key/value heads both divide, the heads' axis: XLA
  cannot split a Pallas call itself, and would otherwise gather every row on every device.
  """
  try:
    q_offset = operator.index(q_offset)
  except TypeError as e:
    raise ValueError("splash attention needs q_offset as a Python int (its causal mask is "
                     f"static), got {q_offset!r}.") from e
  run = functools.partial(_splash_rows, q_offset=q_offset, causal=causal, block_q=block_q,
                          block_k=block_k, interpret=interpret)
  # Without packed rows: every query in segment 1, real keys in 1, padding keys in 0.
  q_seg = (jnp.ones(q.shape[:2], jnp.int32) if segment_ids is None
           else segment_ids.astype(jnp.int32))
  kv_seg = kv_mask.astype(jnp.int32) if segment_ids is None else q_seg
  q_spec = sharding.logical_spec(q.shape, _Q_AXES, rules, "splash queries")
  if q_spec is None:
    return run(q, k, v, q_seg, kv_seg)
  kv_spec = sharding.logical_spec(k.shape, _KV_AXES, rules, "splash keys")
  heads = q_spec[2] if q_spec[2] == kv_spec[2] else None
  q_spec, kv_spec = P(q_spec[0], None, heads, None), P(kv_spec[0], None, heads, None)
  rows = P(q_spec[0], None)
  return jax.shard_map(run, in_specs=(q_spec, kv_spec, kv_spec, rows, rows),
                       out_specs=q_spec, check_vma=False)(q, k, v, q_seg, kv_seg)


def _splash_rows(q, k, v, q_seg, kv_seg, *, q_offset, causal, block_q, block_k,
                 interpret):
  """`splash` on the rows and heads at hand; q_seg [B, T], kv_seg [B, S] segment ids."""
  # Imported on first use: pallas' import costs most of a second, and only splash needs it.
  from jax.experimental.pallas.ops.tpu import (  # pylint: disable=import-outside-toplevel
      splash_attention as sa)

  b, t, h, d = q.shape
  s, dtype = k.shape[1], q.dtype
  bq, bk = _lane_multiple(min(block_q, t)), _lane_multiple(min(block_k, s))
  # Splash's layout: [heads, length, head_dim] per row; it does not scale the scores.
  q = _pad_to(q.transpose(0, 2, 1, 3) * jnp.asarray(d ** -0.5, dtype), 2, bq)
  k, v = (_pad_to(x.transpose(0, 2, 1, 3), 2, bk) for x in (k, v))
  tp, sp = q.shape[2], k.shape[2]
  mask = sa.CausalMask((tp, sp), offset=q_offset) if causal else sa.FullMask((tp, sp))
  blocks = sa.BlockSizes(block_q=bq, block_kv=bk, block_kv_compute=bk, block_q_dkv=bq,
                         block_kv_dkv=bk, block_kv_dkv_compute=bk, block_q_dq=bq,
                         block_kv_dq=bk)
  kernel = sa.make_splash_mha(sa.MultiHeadMask([mask] * h), block_sizes=blocks,
                              head_shards=1, q_seq_shards=1, interpret=interpret)
  # A query attends to keys of its own segment; block padding is segment 0 on both sides.
  segments = sa.SegmentIds(q=_pad_to(q_seg, 1, bq, 0), kv=_pad_to(kv_seg, 1, bk, 0))
  out = jax.vmap(lambda q, k, v, seg: kernel(q, k, v, segment_ids=seg))(q, k, v, segments)
  out = out[:, :, :t].transpose(0, 2, 1, 3)
  # A query that sees no key gets a finite average of masked values from the kernel; it
  # returns zeros as in the other kinds (and so passes no gradient into the kernel).
  kv_mask = kv_seg != 0
  seen = jnp.any(kv_mask, axis=1)[:, None] & (q_seg != 0)
  if causal:
    first_key = jnp.argmax(kv_mask, axis=1)[:, None]
    seen = seen & (first_key <= q_offset + jnp.arange(t)[None, :])
  return jnp.where(seen[:, :, None, None], out, 0).astype(dtype)


# ---------------------------------------------------------------------------------------
# Sampler decode step.


def decode_attention(q, prompt_k, prompt_v, prompt_mask, response_k, response_v,
                     num_written, new_k, new_v, *, layer, block=128, precision=None):
  """One decode step of N = B*G rows, G samples per prompt, in one layer.

  The caches arrive stacked over layers and only what the step reads is sliced out of
  them: taking the layer's whole response cache first would copy all Lr slots of it at
  every step (XLA:CPU materialises such a slice), whatever has been written.

  Args:
    q: [N, H, D] queries of the current token.
    prompt_k, prompt_v: [L, B, K, Lp, D] prompt cache, shared by the G samples of a prompt.
    prompt_mask: bool [B, Lp], True on real prompt tokens.
    response_k, response_v: [L, N, K, Lr, D] response cache; slots [0, num_written) hold
      the earlier response tokens; Lr is a multiple of `block`.
    num_written: int32 scalar, response slots written so far (same for every row).
    new_k, new_v: [N, K, D] keys/values of the current token (not yet in the cache).
    layer: int32 scalar (or int), the layer's index in the stacked caches.
    block: response slots read per loop iteration; only ceil(num_written / block) blocks
      are read, so the response part costs O(num_written), not O(Lr).

  Returns:
    [N, H, D] in q.dtype.
  """
  n, h, d = q.shape
  _, b, kh, lp, _ = prompt_k.shape
  g = n // b
  qg = (q * jnp.asarray(d ** -0.5, q.dtype)).reshape(b, g, kh, h // kh, d)
  upcast = target_platform() == "cpu"

  def mm(eq, a, b):
    # XLA's CPU runtime has no bf16 x bf16 -> f32 kernel for these batched
    # matrix-vector products; on CPU they run in float32 (the result dtype is unchanged).
    if upcast:
      a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    return jnp.einsum(eq, a, b, precision=precision, preferred_element_type=jnp.float32)

  def merge(state, scores, values, eq):
    """Online-softmax update with a block of scores [..., S] and values."""
    m, l, acc = state
    m_new = jnp.maximum(m, jnp.max(scores, axis=-1))
    m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
    p = jnp.exp(scores - m_safe[..., None])
    corr = jnp.exp(m - m_safe)
    acc = acc * corr[..., None] + mm(eq, p.astype(values.dtype), values)
    return m_new, l * corr + jnp.sum(p, axis=-1), acc

  # The current token attends to itself: this starts every row's softmax.
  self_scores = mm("bgkhd,bgkd->bgkh", qg, new_k.reshape(b, g, kh, d))
  state = (self_scores, jnp.ones_like(self_scores),
           new_v.reshape(b, g, kh, 1, d).astype(jnp.float32) * jnp.ones((h // kh, 1)))
  # Prompt: one matmul against the layer's shared cache, all of which is read.
  prompt_k, prompt_v = (jax.lax.dynamic_index_in_dim(x, layer, 0, keepdims=False)
                        for x in (prompt_k, prompt_v))
  scores = mm("bgkhd,bksd->bgkhs", qg, prompt_k)
  scores = jnp.where(prompt_mask[:, None, None, None, :], scores, -jnp.inf)
  state = merge(state, scores, prompt_v, "bgkhs,bksd->bgkhd")
  # Response: only the blocks that hold written slots. Each block is sliced from the
  # stacked cache as it is stored and only then split into (prompt, sample): reshaping
  # the whole cache first made XLA:CPU copy all of it, every layer and step.

  def response_block(j, state):
    start, size = (layer, 0, 0, j * block, 0), (1, n, kh, block, d)
    k_j, v_j = (jax.lax.dynamic_slice(x, start, size).reshape(b, g, kh, block, d)
                for x in (response_k, response_v))
    scores = mm("bgkhd,bgksd->bgkhs", qg, k_j)
    written = j * block + jnp.arange(block) < num_written
    scores = jnp.where(written, scores, -jnp.inf)
    return merge(state, scores, v_j, "bgkhs,bgksd->bgkhd")

  num_blocks = (num_written + block - 1) // block
  _, l, acc = jax.lax.fori_loop(0, num_blocks, response_block, state)
  return (acc / l[..., None]).reshape(n, h, d).astype(q.dtype)
