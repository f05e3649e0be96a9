"""Flash-style blockwise attention in pure JAX, with a custom VJP (`attention` kind 'blockwise').

Kept apart from `models.attention`, which chooses among the kinds: this is the portable
kernel itself, the one every backend can run, and the largest piece of attention code.
Online softmax over key blocks inside a `lax.scan`, query blocks in an outer map, and a
custom VJP that recomputes each block's probabilities from the saved log-sum-exp, so
neither pass holds more than one [B, H, block_q, block_k] score block. Blocks that no
query of a query block can see (above the causal diagonal, pure padding, or, with segment
ids, of segments the query block does not hold) are skipped with `lax.cond`.

Internal layout: q [B, K, G, T, D] (pre-scaled by 1/sqrt(D)), k/v [B, S, K, D].
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

DEFAULT_BLOCK = 512


def pad_to(x, axis, multiple, value=0):
  """x padded with `value` at the end of `axis` up to a multiple of `multiple` (also used
  by the splash wrapper in `models.kernels`)."""
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
  qg = pad_to(qg, 3, bq)
  k, v = pad_to(k, 1, bk), pad_to(v, 1, bk)
  if segment_ids is None:
    q_seg = jnp.ones((b, t), jnp.int32)
    kv_seg = kv_mask.astype(jnp.int32)
  else:
    q_seg = kv_seg = segment_ids.astype(jnp.int32)
  # Padded query slots get -1 (they match no key, not even padding keys in segment 0).
  q_seg = pad_to(q_seg, 1, bq, -1)
  kv_seg = pad_to(kv_seg, 1, bk, 0)
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
