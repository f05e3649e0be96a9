"""The vendor kernels behind `attention` kinds 'cudnn' (GPU) and 'splash' (TPU).

Kept apart from `models.attention`, which decides whether a kernel applies to the inputs
and backend at hand: these wrappers only adapt the model's inputs to each kernel's
contract (cuDNN's right-padded lengths or dense mask; splash's lane-sized blocks, segment
ids, and a `shard_map` because XLA cannot split a Pallas call). Their contracts and costs
are those of the kinds in the `models.attention` docstring.
"""

from __future__ import annotations

import functools
import operator

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from mopd_jax import sharding
from mopd_jax.models.blockwise import DEFAULT_BLOCK, pad_to

SPLASH_LANES = 128  # splash's blocks are whole multiples of the TPU lane width
# Logical axes of q [B, T, H, D] and k, v [B, S, K, D], as the model constrains them.
_Q_AXES = ("activation_batch", "activation_length", "activation_heads", "activation_kv")
_KV_AXES = ("activation_batch", "activation_length", "activation_kv_heads", "activation_kv")


# ---------------------------------------------------------------------------------------
# cuDNN.


def _shift_rows(x, shift):
  """Rolls each row of x [B, L, ...] left by shift [B] (row b: out[t] = x[t + shift])."""
  length = x.shape[1]
  index = (jnp.arange(length)[None, :] + shift[:, None]) % length
  index = index.reshape(index.shape + (1,) * (x.ndim - 2))
  return jnp.take_along_axis(x, index, axis=1)


def cudnn(q, k, v, kv_mask, *, causal, segment_ids=None):
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
  q = pad_to(q.transpose(0, 2, 1, 3) * jnp.asarray(d ** -0.5, dtype), 2, bq)
  k, v = (pad_to(x.transpose(0, 2, 1, 3), 2, bk) for x in (k, v))
  tp, sp = q.shape[2], k.shape[2]
  mask = sa.CausalMask((tp, sp), offset=q_offset) if causal else sa.FullMask((tp, sp))
  blocks = sa.BlockSizes(block_q=bq, block_kv=bk, block_kv_compute=bk, block_q_dkv=bq,
                         block_kv_dkv=bk, block_kv_dkv_compute=bk, block_q_dq=bq,
                         block_kv_dq=bk)
  kernel = sa.make_splash_mha(sa.MultiHeadMask([mask] * h), block_sizes=blocks,
                              head_shards=1, q_seq_shards=1, interpret=interpret)
  # A query attends to keys of its own segment; block padding is segment 0 on both sides.
  segments = sa.SegmentIds(q=pad_to(q_seg, 1, bq, 0), kv=pad_to(kv_seg, 1, bk, 0))
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
