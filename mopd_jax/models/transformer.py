"""Decoder-only transformer of the Qwen3 / Llama family, as pure functions.

RMSNorm, rotary position embeddings, grouped-query attention, SwiGLU MLP, optional
RMSNorm on queries and keys (Qwen3), q/k/v biases (Qwen2.5), Llama 3.x RoPE scaling,
tied or untied embeddings. Every parameter carries logical axis names (`embed`, `heads`,
`kv_heads`, `head_dim`, `mlp`, `vocab`) that `mopd_jax.sharding` maps onto mesh axes.

Two entry points share one code path:
- full-sequence forward (training, teacher scoring): `hidden_states(..., cache=None)`.
- cached forward (sampling): `hidden_states(..., cache=cache, cache_index=i)` writes the
  new keys/values into the cache at slots [i, i + T) and attends over the whole cache
  under `attn_mask` [B, T, S] (S = cache length).

Padding convention: `attn_mask[b, q, k]` is True where query q may attend key k. Callers
build it from a token mask with `causal_mask`; rows may be left- or right-padded, and
`positions` (from `positions_from_mask`) make RoPE independent of the padding.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def dtype_from_name(name: str):
  if name not in _DTYPES:
    raise ValueError(f"Unknown dtype {name!r}; allowed: {sorted(_DTYPES)}.")
  return _DTYPES[name]


@dataclasses.dataclass(frozen=True)
class Llama3RopeScaling:
  """Llama 3.x ("llama3") RoPE scaling: long wavelengths are stretched by `factor`.

  With L = original_max_position_embeddings, rotary frequencies whose wavelength is shorter
  than L / high_freq_factor are kept, those longer than L / low_freq_factor are divided by
  `factor`, and those in between are interpolated smoothly.
  """

  factor: float
  low_freq_factor: float
  high_freq_factor: float
  original_max_position_embeddings: int

  def __post_init__(self):
    if self.factor <= 0 or self.original_max_position_embeddings <= 0:
      raise ValueError(
          f"RoPE scaling needs a positive factor and original_max_position_embeddings, got "
          f"factor={self.factor!r}, "
          f"original_max_position_embeddings={self.original_max_position_embeddings!r}.")
    if not 0 < self.low_freq_factor < self.high_freq_factor:
      raise ValueError(
          f"RoPE scaling needs 0 < low_freq_factor < high_freq_factor, got "
          f"low_freq_factor={self.low_freq_factor!r}, "
          f"high_freq_factor={self.high_freq_factor!r}.")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Shapes and numerics of a decoder. Hashable: usable as a static jit argument."""

  vocab_size: int
  num_layers: int
  embed_dim: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  mlp_dim: int
  rope_theta: float = 10_000.0
  norm_eps: float = 1e-6
  qk_norm: bool = False
  qkv_bias: bool = False
  tie_embeddings: bool = True
  param_dtype: str = "float32"
  dtype: str = "float32"  # compute dtype of activations and matmuls
  remat: bool = True  # rematerialise each block in the backward pass
  rope_scaling: Llama3RopeScaling | None = None

  def __post_init__(self):
    for name in ("vocab_size", "num_layers", "embed_dim", "num_heads",
                 "num_kv_heads", "head_dim", "mlp_dim"):
      value = getattr(self, name)
      if not isinstance(value, int) or value <= 0:
        raise ValueError(f"model.{name} must be a positive integer, got {value!r}.")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
          f"model.num_heads ({self.num_heads}) must be a multiple of "
          f"model.num_kv_heads ({self.num_kv_heads}).")
    if self.head_dim % 2:
      raise ValueError(f"model.head_dim must be even for RoPE, got {self.head_dim}.")
    dtype_from_name(self.param_dtype)
    dtype_from_name(self.dtype)
    if isinstance(self.rope_scaling, dict):  # as read back from `dataclasses.asdict` JSON
      object.__setattr__(self, "rope_scaling", Llama3RopeScaling(**self.rope_scaling))
    if self.rope_scaling is not None and not isinstance(self.rope_scaling, Llama3RopeScaling):
      raise ValueError(
          f"model.rope_scaling must be None or a Llama3RopeScaling, got {self.rope_scaling!r}.")

  @property
  def num_params(self) -> int:
    d, h, kv, hd, f, v = (self.embed_dim, self.num_heads, self.num_kv_heads,
                          self.head_dim, self.mlp_dim, self.vocab_size)
    attn = d * h * hd + 2 * d * kv * hd + h * hd * d
    if self.qkv_bias:
      attn += h * hd + 2 * kv * hd
    if self.qk_norm:
      attn += 2 * hd
    per_layer = attn + 3 * d * f + 2 * d
    return v * d * (1 if self.tie_embeddings else 2) + self.num_layers * per_layer + d


def positions_from_mask(mask: jax.Array) -> jax.Array:
  """int32 [B, L] positions counting real tokens only (0 on leading padding)."""
  return jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=-1) - 1, 0)


def causal_mask(token_mask: jax.Array) -> jax.Array:
  """bool [B, L, L]: query q attends key k iff k <= q and both are real tokens."""
  length = token_mask.shape[-1]
  causal = jnp.tril(jnp.ones((length, length), dtype=bool))
  return causal[None] & token_mask[:, None, :] & token_mask[:, :, None]


def _rope_frequencies(head_dim, theta, scaling):
  """float32 [head_dim / 2] rotary frequencies (radians per position)."""
  freq = theta ** (-jnp.arange(head_dim // 2, dtype=jnp.float32) * 2.0 / head_dim)
  if scaling is None:
    return freq
  context = scaling.original_max_position_embeddings
  wavelength = 2 * jnp.pi / freq
  long_wave = wavelength > context / scaling.low_freq_factor
  short_wave = wavelength < context / scaling.high_freq_factor
  smooth = ((context / wavelength - scaling.low_freq_factor) /
            (scaling.high_freq_factor - scaling.low_freq_factor))
  between = (1 - smooth) * freq / scaling.factor + smooth * freq
  return jnp.where(long_wave, freq / scaling.factor, jnp.where(short_wave, freq, between))


def _apply_rope(x, positions, theta, scaling=None):
  """x [B, T, H, D]; rotate-half convention (as in Llama / Qwen checkpoints)."""
  freq = _rope_frequencies(x.shape[-1], theta, scaling)
  angles = positions[..., None].astype(jnp.float32) * freq  # [B, T, D/2]
  sin = jnp.sin(angles)[:, :, None, :]
  cos = jnp.cos(angles)[:, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


def _init(axes, std=0.02):
  return nn.with_logical_partitioning(nn.initializers.normal(std), axes)


class RMSNorm(nn.Module):
  eps: float
  param_dtype: Any
  axis_name: str = "embed"

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.with_logical_partitioning(
        nn.initializers.ones, (self.axis_name,)), (x.shape[-1],), self.param_dtype)
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (normed.astype(x.dtype) * scale.astype(x.dtype))


class Attention(nn.Module):
  config: ModelConfig

  @nn.compact
  def __call__(self, x, positions, attn_mask, cache, cache_index):
    cfg = self.config
    dtype, pdtype = dtype_from_name(cfg.dtype), dtype_from_name(cfg.param_dtype)

    def proj(name, heads, head_axis):
      return nn.DenseGeneral(
          (heads, cfg.head_dim), use_bias=cfg.qkv_bias, dtype=dtype, param_dtype=pdtype,
          kernel_init=_init(("embed", head_axis, "head_dim")),
          bias_init=nn.with_logical_partitioning(nn.initializers.zeros,
                                                 (head_axis, "head_dim")),
          name=name)(x)

    q = proj("q_proj", cfg.num_heads, "heads")  # [B, T, H, Dh]
    k = proj("k_proj", cfg.num_kv_heads, "kv_heads")  # [B, T, K, Dh]
    v = proj("v_proj", cfg.num_kv_heads, "kv_heads")
    if cfg.qk_norm:
      q = RMSNorm(cfg.norm_eps, pdtype, "head_dim", name="q_norm")(q)
      k = RMSNorm(cfg.norm_eps, pdtype, "head_dim", name="k_norm")(k)
    q = _apply_rope(q, positions, cfg.rope_theta, cfg.rope_scaling)
    k = _apply_rope(k, positions, cfg.rope_theta, cfg.rope_scaling)

    new_cache = None
    if cache is not None:
      # Write this chunk's keys/values at [cache_index, cache_index + T) and attend
      # over the whole cache; `attn_mask` hides unwritten and padding slots.
      ck = jax.lax.dynamic_update_slice_in_dim(cache["k"], k.astype(cache["k"].dtype),
                                               cache_index, axis=1)
      cv = jax.lax.dynamic_update_slice_in_dim(cache["v"], v.astype(cache["v"].dtype),
                                               cache_index, axis=1)
      new_cache = {"k": ck, "v": cv}
      k, v = ck.astype(dtype), cv.astype(dtype)

    b, t, h, d = q.shape
    groups = h // cfg.num_kv_heads
    q = q.reshape(b, t, cfg.num_kv_heads, groups, d)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k,
                        preferred_element_type=jnp.float32) * (d ** -0.5)
    scores = jnp.where(attn_mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v).reshape(b, t, h, d)
    out = nn.DenseGeneral(
        cfg.embed_dim, axis=(-2, -1), use_bias=False, dtype=dtype, param_dtype=pdtype,
        kernel_init=_init(("heads", "head_dim", "embed")), name="o_proj")(out)
    return out, new_cache


class MLP(nn.Module):
  config: ModelConfig

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    dtype, pdtype = dtype_from_name(cfg.dtype), dtype_from_name(cfg.param_dtype)
    dense = lambda feat, axes, name: nn.Dense(  # noqa: E731
        feat, use_bias=False, dtype=dtype, param_dtype=pdtype,
        kernel_init=_init(axes), name=name)
    gate = dense(cfg.mlp_dim, ("embed", "mlp"), "gate_proj")(x)
    up = dense(cfg.mlp_dim, ("embed", "mlp"), "up_proj")(x)
    return dense(cfg.embed_dim, ("mlp", "embed"), "down_proj")(nn.silu(gate) * up)


class Block(nn.Module):
  config: ModelConfig

  @nn.compact
  def __call__(self, x, positions, attn_mask, cache, cache_index):
    cfg = self.config
    pdtype = dtype_from_name(cfg.param_dtype)
    h, new_cache = Attention(cfg, name="attn")(
        RMSNorm(cfg.norm_eps, pdtype, name="input_norm")(x),
        positions, attn_mask, cache, cache_index)
    x = x + h
    x = x + MLP(cfg, name="mlp")(RMSNorm(cfg.norm_eps, pdtype, name="post_attn_norm")(x))
    x = nn.with_logical_constraint(x, ("batch", "length", "act_embed"))
    return x, new_cache


class Decoder(nn.Module):
  """Returns final-normed hidden states [B, T, D] and the updated cache (or None)."""

  config: ModelConfig

  @nn.compact
  def __call__(self, tokens, positions, attn_mask, cache=None, cache_index=0):
    cfg = self.config
    dtype, pdtype = dtype_from_name(cfg.dtype), dtype_from_name(cfg.param_dtype)
    embedding = self.param("embedding", _init(("vocab", "embed"), cfg.embed_dim ** -0.5),
                           (cfg.vocab_size, cfg.embed_dim), pdtype)
    x = jnp.take(embedding, tokens, axis=0).astype(dtype)
    if not cfg.tie_embeddings:
      self.param("lm_head", _init(("embed", "vocab")), (cfg.embed_dim, cfg.vocab_size),
                 pdtype)
    block_cls = nn.remat(Block, static_argnums=()) if cfg.remat else Block
    new_cache = [] if cache is not None else None
    for i in range(cfg.num_layers):
      layer_cache = cache[i] if cache is not None else None
      x, c = block_cls(cfg, name=f"layer_{i}")(x, positions, attn_mask, layer_cache,
                                               cache_index)
      if cache is not None:
        new_cache.append(c)
    x = RMSNorm(cfg.norm_eps, pdtype, name="final_norm")(x)
    return x, new_cache


def init_params(config: ModelConfig, key: jax.Array):
  """Unboxed parameter pytree (use `param_logical_axes` for the axis names)."""
  return nn.unbox(_init_boxed(config, key))


def _init_boxed(config, key):
  tokens = jnp.zeros((1, 2), jnp.int32)
  mask = causal_mask(jnp.ones((1, 2), bool))
  return Decoder(config).init(key, tokens, positions_from_mask(mask[:, 0]), mask)["params"]


def param_logical_axes(config: ModelConfig):
  """Pytree of PartitionSpecs over logical axis names, matching `init_params`."""
  boxed = jax.eval_shape(lambda: _init_boxed(config, jax.random.key(0)))
  return nn.get_partition_spec(boxed)


def hidden_states(config, params, tokens, positions, attn_mask, cache=None,
                  cache_index=0):
  """tokens int32 [B, T] -> (hidden [B, T, D] in compute dtype, new cache or None)."""
  return Decoder(config).apply({"params": params}, tokens, positions, attn_mask,
                               cache, cache_index)


def lm_head(config: ModelConfig, params) -> jax.Array:
  """[D, V] output projection (the transposed embedding when tied)."""
  if config.tie_embeddings:
    return params["embedding"].T
  return params["lm_head"]


def project(config, params, hidden) -> jax.Array:
  """float32 logits [..., V] from hidden states [..., D]."""
  head = lm_head(config, params).astype(hidden.dtype)
  return jnp.einsum("...d,dv->...v", hidden, head, preferred_element_type=jnp.float32)


def logits(model_config, params, tokens, attention_mask) -> jax.Array:
  """float32 logits [B, L, V] of a full forward; attention_mask bool/int [B, L]."""
  token_mask = attention_mask.astype(bool)
  hidden, _ = hidden_states(model_config, params, tokens,
                            positions_from_mask(token_mask), causal_mask(token_mask))
  return project(model_config, params, hidden)


def init_cache(config: ModelConfig, batch: int, length: int, dtype=None):
  """Per-layer {'k', 'v'} arrays [B, S, K, Dh], zero-filled."""
  dtype = dtype or dtype_from_name(config.dtype)
  shape = (batch, length, config.num_kv_heads, config.head_dim)
  return [{"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
          for _ in range(config.num_layers)]
