"""Shapes and numerics of a decoder: `ModelConfig` and the names its fields accept.

Kept apart from `models.transformer` (the model itself) because nearly every module of
the project reads a `ModelConfig` while few run the model; `transformer` re-exports these
names, so `transformer.ModelConfig` stays the usual spelling.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from mopd_jax import sharding
from mopd_jax.models import attention as attention_lib

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable":
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "everything_saveable": jax.checkpoint_policies.everything_saveable,
}


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
  # Per-layer jax.checkpoint policy in the backward pass ("none" = keep all activations).
  remat_policy: str = "full"
  # Layers run under `nn.scan` (compile time independent of depth); True unrolls the scan
  # (same stacked parameters), which tiny models on a CPU run faster.
  unroll_layers: bool = False
  rope_scaling: Llama3RopeScaling | None = None
  attention: str = "auto"  # see models.attention.KINDS
  # Precision of float32 matmuls: "default" lets GPUs / TPUs use TF32 / bfloat16 passes.
  matmul_precision: str = "default"
  # Logical axis rules of the activations and the KV cache (`sharding.DEFAULT_RULES` in a
  # run; the sampler traces with `sharding.DECODE_RULES`). Static, so every jit of a model
  # function has them in its cache key. None: no sharding constraints (one device).
  axis_rules: tuple | None = None

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
    if not isinstance(self.unroll_layers, bool):
      raise ValueError(f"model.unroll_layers must be True or False, got {self.unroll_layers!r}.")
    if self.remat_policy not in REMAT_POLICIES:
      raise ValueError(f"model.remat_policy {self.remat_policy!r} is unknown; allowed: "
                       f"{list(REMAT_POLICIES)}.")
    if self.attention not in attention_lib.KINDS:
      raise ValueError(f"model.attention {self.attention!r} is unknown; allowed: "
                       f"{list(attention_lib.KINDS)}.")
    if self.matmul_precision not in attention_lib.PRECISIONS:
      raise ValueError(f"model.matmul_precision {self.matmul_precision!r} is unknown; "
                       f"allowed: {list(attention_lib.PRECISIONS)}.")
    if self.axis_rules is not None:
      object.__setattr__(self, "axis_rules", sharding.check_rules(self.axis_rules))
    if isinstance(self.rope_scaling, dict):  # as read back from `dataclasses.asdict` JSON
      object.__setattr__(self, "rope_scaling", Llama3RopeScaling(**self.rope_scaling))
    if self.rope_scaling is not None and not isinstance(self.rope_scaling, Llama3RopeScaling):
      raise ValueError(
          f"model.rope_scaling must be None or a Llama3RopeScaling, got {self.rope_scaling!r}.")

  @property
  def precision(self):
    """`jax.lax.Precision` of every matmul (None = the backend default)."""
    return attention_lib.PRECISIONS[self.matmul_precision]

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
