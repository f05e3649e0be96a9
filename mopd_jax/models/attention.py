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

This module chooses and checks; the kernels live in sibling modules: `models.blockwise`
(the flash-style kernel and its custom VJP), `models.kernels` (the cuDNN and splash
wrappers). The sampler's one-token step over the KV caches is `models.decode_attention`.
"""

from __future__ import annotations

from absl import logging
import jax
import jax.numpy as jnp

from mopd_jax.choices import ATTENTION_KINDS as KINDS
from mopd_jax.models.blockwise import DEFAULT_BLOCK, blockwise
from mopd_jax.models.kernels import cudnn, splash

PRECISIONS = {  # keys: choices.MATMUL_PRECISIONS
    "default": None,
    "high": jax.lax.Precision.HIGH,
    "highest": jax.lax.Precision.HIGHEST,
}


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
  return cudnn(q, k, v, kv_mask, causal=causal, segment_ids=segment_ids)


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
