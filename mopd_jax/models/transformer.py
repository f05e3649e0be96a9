"""Decoder-only transformer of the Qwen3 / Llama family, as pure functions.

RMSNorm, rotary position embeddings, grouped-query attention, SwiGLU MLP, optional
RMSNorm on queries and keys (Qwen3), q/k/v biases (Qwen2.5), Llama 3.x RoPE scaling,
tied or untied embeddings. Every parameter carries logical axis names (`embed`, `heads`,
`kv_heads`, `head_dim`, `mlp`, `vocab`, and `layers` for the stacked per-layer axis) that
`mopd_jax.sharding` maps onto mesh axes; activations and the KV cache carry
`activation_*` / `cache_*` names, constrained by the config's `axis_rules` on the context
mesh (see `mopd_jax.sharding`).

Layers are stacked: every per-layer parameter has a leading `layers` axis of size
num_layers (params["layers"]["attn"]["q_proj"]["kernel"] is [L, D, H, Dh]), and the stack
runs under `nn.scan`, so compile time does not grow with depth (`unroll_layers` unrolls
that scan, for tiny models on a CPU). `remat_policy` names the
`jax.checkpoint` policy of each layer in the backward pass.

Entry points:
- `hidden_states(cfg, params, tokens, positions, token_mask)`: full-sequence causal
  forward (training, teacher scoring); `token_mask` [B, L] is True on real tokens, rows
  may be left- and right-padded, and `positions` (from `positions_from_mask`) make RoPE
  independent of the padding. A dense bool mask [B, T, S] (`causal_mask`) is accepted for
  arbitrary masks, but only the `naive` kind can use it. Packed rows (`mopd_jax.packing`)
  add `segment_ids` [B, L]: attention stays within a segment, positions restart at 0.
- `models.decoding` (`prefill`, `decode_step`): the sampler's cached forward, built on
  this module's `Decoder` in modes "prefill" and "decode" (see `mopd_jax.sampling`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp

from mopd_jax import sharding
from mopd_jax.models import attention as attention_lib
from mopd_jax.models import decode_attention as decode_attention_lib

# Re-exported: `transformer.ModelConfig` and its helpers are imported under this module's
# name throughout the project (configs, training, sampling, tests, benchmarks).
from mopd_jax.models.model_config import (  # pylint: disable=unused-import
    REMAT_POLICIES, Llama3RopeScaling, ModelConfig, dtype_from_name)

# Logical names of activations and of the KV cache (rules in `mopd_jax.sharding`).
ACT_EMBED = ("activation_batch", "activation_length", "activation_embed")
ACT_HEADS = ("activation_batch", "activation_length", "activation_heads", "activation_kv")
ACT_KV_HEADS = ("activation_batch", "activation_length", "activation_kv_heads",
                "activation_kv")
ACT_MLP = ("activation_batch", "activation_length", "activation_mlp")
ACT_VOCAB = ("activation_batch", "activation_length", "activation_vocab")
# Heads before sequence: the decode step's matmuls batch over (row, head) without a
# transposed copy of the cache.
CACHE = ("layers", "cache_batch", "cache_heads", "cache_sequence", "cache_kv")


def positions_from_mask(mask: jax.Array) -> jax.Array:
  """int32 [B, L] positions counting real tokens only (0 on leading padding)."""
  return jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=-1) - 1, 0)


def causal_mask(token_mask: jax.Array) -> jax.Array:
  """bool [B, L, L]: query q attends key k iff k <= q and both are real tokens.

  O(B * L^2) bytes: for tests and arbitrary masks; the model itself takes `token_mask`.
  """
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


class LayerInputs(NamedTuple):
  """What every layer reads besides the residual stream (None where the mode has none).

  mode "full" / "prefill": positions [B, T] and token_mask, the token mask [B, T]
  (causal attention over real tokens) or a dense bool mask [B, T, T]; mode "full" may add
  segment_ids [B, T] (packed rows: attention within a segment; 0 = padding).
  mode "decode": positions [N, 1], prompt_mask [B, Lp], num_written (int32 scalar: the
  response slot of the current token) and caches, the prompt and response caches stacked
  over layers ({"prompt_k", "prompt_v", "response_k", "response_v"}).
  """

  positions: jax.Array
  token_mask: jax.Array | None = None
  prompt_mask: jax.Array | None = None
  num_written: jax.Array | None = None
  caches: dict | None = None
  segment_ids: jax.Array | None = None


class Attention(nn.Module):
  """Self-attention of one layer; keyword arguments as the fields of `LayerInputs`.

  Returns (out, None) in mode "full", (out, (k, v) [B, T, K, Dh] after RoPE) in mode
  "prefill" (for the prompt cache), and (out, (k, v) [N, K, Dh] of the current token) in
  mode "decode", where `layer` is this layer's index in the stacked caches.
  """

  config: ModelConfig
  mode: str = "full"
  decode_block: int = 128

  @nn.compact
  def __call__(self, x, *, positions, token_mask=None, prompt_mask=None, num_written=None,
               caches=None, segment_ids=None, layer=None):
    cfg = self.config
    dtype, pdtype = dtype_from_name(cfg.dtype), dtype_from_name(cfg.param_dtype)

    def proj(name, heads, head_axis):
      return nn.DenseGeneral(
          (heads, cfg.head_dim), use_bias=cfg.qkv_bias, dtype=dtype, param_dtype=pdtype,
          precision=cfg.precision, kernel_init=_init(("embed", head_axis, "head_dim")),
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
    rules = cfg.axis_rules
    q = sharding.constrain(q, ACT_HEADS, rules, "attention queries")
    k = sharding.constrain(k, ACT_KV_HEADS, rules, "attention keys")
    v = sharding.constrain(v, ACT_KV_HEADS, rules, "attention values")

    if self.mode == "decode":
      out = decode_attention_lib.decode_attention(
          q[:, 0], caches["prompt_k"], caches["prompt_v"], prompt_mask, caches["response_k"],
          caches["response_v"], num_written, k[:, 0], v[:, 0], layer=layer,
          block=self.decode_block, precision=cfg.precision)
      out, new_kv = out[:, None], (k[:, 0], v[:, 0])
    else:
      mask = token_mask
      if mask.ndim == 3:
        if cfg.attention != "naive":
          logging.info("A dense [B, T, S] attention mask was given: attention %r falls back "
                       "to 'naive'; pass the token mask [B, L] to avoid it.", cfg.attention)
        out = attention_lib.naive(q, k, v, mask, precision=cfg.precision)
      else:
        out = attention_lib.attention(q, k, v, mask, kind=cfg.attention, causal=True,
                                      precision=cfg.precision, segment_ids=segment_ids,
                                      rules=rules)
      new_kv = (k, v) if self.mode == "prefill" else None
    out = sharding.constrain(out, ACT_HEADS, rules, "attention output")
    out = nn.DenseGeneral(
        cfg.embed_dim, axis=(-2, -1), use_bias=False, dtype=dtype, param_dtype=pdtype,
        precision=cfg.precision, kernel_init=_init(("heads", "head_dim", "embed")),
        name="o_proj")(out)
    return out, new_kv


class MLP(nn.Module):
  config: ModelConfig

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    dtype, pdtype = dtype_from_name(cfg.dtype), dtype_from_name(cfg.param_dtype)
    dense = lambda feat, axes, name: nn.Dense(  # noqa: E731
        feat, use_bias=False, dtype=dtype, param_dtype=pdtype, precision=cfg.precision,
        kernel_init=_init(axes), name=name)
    gate = dense(cfg.mlp_dim, ("embed", "mlp"), "gate_proj")(x)
    up = dense(cfg.mlp_dim, ("embed", "mlp"), "up_proj")(x)
    hidden = sharding.constrain(nn.silu(gate) * up, ACT_MLP, cfg.axis_rules, "MLP hidden")
    return dense(cfg.embed_dim, ("mlp", "embed"), "down_proj")(hidden)


class Block(nn.Module):
  """One pre-norm layer; the scan body: (x, `LayerInputs`, layer index or None) ->
  (x, layer's new k/v). Positional because `nn.scan` broadcasts / scans its arguments."""

  config: ModelConfig
  mode: str = "full"
  decode_block: int = 128

  @nn.compact
  def __call__(self, x, inputs: LayerInputs, layer):
    cfg = self.config
    pdtype = dtype_from_name(cfg.param_dtype)
    h, new_kv = Attention(cfg, self.mode, self.decode_block, name="attn")(
        RMSNorm(cfg.norm_eps, pdtype, name="input_norm")(x), **inputs._asdict(), layer=layer)
    x = x + h
    x = x + MLP(cfg, name="mlp")(RMSNorm(cfg.norm_eps, pdtype, name="post_attn_norm")(x))
    return sharding.constrain(x, ACT_EMBED, cfg.axis_rules, "layer output"), new_kv


class Decoder(nn.Module):
  """Returns final-normed hidden states [B, T, D] and the per-layer k/v stacked [L, ...].

  Keyword arguments as the fields of `LayerInputs`; mode "decode" also takes `layers`,
  int32 [L] (the layer index each scanned layer reads its caches at).
  """

  config: ModelConfig
  mode: str = "full"
  decode_block: int = 128

  @nn.compact
  def __call__(self, tokens, *, positions, token_mask=None, prompt_mask=None,
               num_written=None, caches=None, layers=None, segment_ids=None):
    cfg = self.config
    dtype, pdtype = dtype_from_name(cfg.dtype), dtype_from_name(cfg.param_dtype)
    embedding = self.param("embedding", _init(("vocab", "embed"), cfg.embed_dim ** -0.5),
                           (cfg.vocab_size, cfg.embed_dim), pdtype)
    x = sharding.constrain(jnp.take(embedding, tokens, axis=0).astype(dtype), ACT_EMBED,
                           cfg.axis_rules, "embedded tokens")
    if not cfg.tie_embeddings:
      self.param("lm_head", _init(("embed", "vocab")), (cfg.embed_dim, cfg.vocab_size),
                 pdtype)
    block_cls = Block
    policy = REMAT_POLICIES[cfg.remat_policy]
    if cfg.remat_policy != "none" and self.mode == "full":  # only training differentiates
      block_cls = nn.remat(Block, policy=policy, prevent_cse=False)
    stack = nn.scan(block_cls, variable_axes={"params": 0}, split_rngs={"params": True},
                    in_axes=(nn.broadcast, 0), length=cfg.num_layers,
                    unroll=cfg.num_layers if cfg.unroll_layers else 1,
                    metadata_params={nn.PARTITION_NAME: "layers"})
    inputs = LayerInputs(positions=positions, token_mask=token_mask, prompt_mask=prompt_mask,
                         num_written=num_written, caches=caches, segment_ids=segment_ids)
    x, new_kv = stack(cfg, self.mode, self.decode_block, name="layers")(x, inputs, layers)
    x = RMSNorm(cfg.norm_eps, pdtype, name="final_norm")(x)
    return x, new_kv


@functools.partial(jax.jit, static_argnames=("config",))
def init_params(config: ModelConfig, key: jax.Array):
  """Unboxed parameter pytree (use `param_logical_axes` for the axis names).

  Jitted (the config is static): called eagerly, the scanned layers would be traced and
  compiled again at every call.
  """
  return nn.unbox(_init_boxed(config, key))


def _init_boxed(config, key):
  tokens = jnp.zeros((1, 2), jnp.int32)
  mask = jnp.ones((1, 2), bool)
  # The parameters do not depend on the attention kernel; a portable one lets a host
  # build the shapes of a model configured for another platform's kernel.
  # Nor on the activations' layout: no constraints (), whatever the context mesh.
  config = dataclasses.replace(config, attention="naive", axis_rules=())
  return Decoder(config).init(key, tokens, positions=positions_from_mask(mask),
                              token_mask=mask)["params"]


def param_logical_axes(config: ModelConfig):
  """Pytree of PartitionSpecs over logical axis names, matching `init_params`."""
  boxed = jax.eval_shape(lambda: _init_boxed(config, jax.random.key(0)))
  return nn.get_partition_spec(boxed)


def hidden_states(config, params, tokens, positions, token_mask, segment_ids=None):
  """tokens int32 [B, T] -> (hidden [B, T, D] in compute dtype, None).

  `token_mask` is bool [B, T] (causal attention over real tokens) or a dense bool mask
  [B, T, T] (naive attention only). `segment_ids` int32 [B, T]: packed rows, each token
  attends only earlier tokens of its own segment (then token_mask is segment_ids != 0).
  """
  token_mask = token_mask.astype(bool)
  return Decoder(config).apply({"params": params}, tokens, positions=positions,
                               token_mask=token_mask, segment_ids=segment_ids)


def lm_head(config: ModelConfig, params) -> jax.Array:
  """[D, V] output projection (the transposed embedding when tied)."""
  if config.tie_embeddings:
    return params["embedding"].T
  return params["lm_head"]


def project(config, params, hidden) -> jax.Array:
  """float32 logits [..., V] from hidden states [..., D]."""
  # A tied head contracts the embedding [V, D] directly, not a transposed copy of it.
  if config.tie_embeddings:
    equation, head = "...d,vd->...v", params["embedding"]
  else:
    equation, head = "...d,dv->...v", params["lm_head"]
  out = jnp.einsum(equation, hidden, head.astype(hidden.dtype), precision=config.precision,
                   preferred_element_type=jnp.float32)
  if out.ndim == 3:
    out = sharding.constrain(out, ACT_VOCAB, config.axis_rules, "logits")
  return out


def logits(model_config, params, tokens, attention_mask) -> jax.Array:
  """float32 logits [B, L, V] of a full forward; attention_mask bool/int [B, L]."""
  token_mask = attention_mask.astype(bool)
  hidden, _ = hidden_states(model_config, params, tokens, positions_from_mask(token_mask),
                            token_mask)
  return project(model_config, params, hidden)
