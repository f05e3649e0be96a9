"""The sampler's cached forward of the decoder: prompt prefill, response cache, one-token step.

Kept apart from `models.transformer`, which defines the model and its full-sequence
forward (training, teacher scoring): these entry points exist only for `mopd_jax.sampling`
and reuse the model's modules in modes "prefill" and "decode". The prompt cache is shared
by the G samples of each prompt; the response cache holds each sample's own tokens.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mopd_jax import sharding
from mopd_jax.models.transformer import (ACT_EMBED, CACHE, Block, Decoder, LayerInputs,
                                         ModelConfig, RMSNorm, dtype_from_name,
                                         positions_from_mask)


def prefill(config, params, tokens, token_mask):
  """Forward of left-padded prompts [B, Lp]; returns (hidden [B, Lp, D], prompt cache).

  The prompt cache is {"k", "v"}: [L, B, K, Lp, Dh] in the compute dtype, named
  ("layers", "cache_batch", "cache_heads", "cache_sequence", "cache_kv").
  """
  token_mask = token_mask.astype(bool)
  hidden, (k, v) = Decoder(config, "prefill").apply(
      {"params": params}, tokens, positions=positions_from_mask(token_mask),
      token_mask=token_mask)
  k, v = (sharding.constrain(x.transpose(0, 1, 3, 2, 4), CACHE, config.axis_rules,
                             "prompt cache") for x in (k, v))
  return hidden, {"k": k, "v": v}


def init_response_cache(config: ModelConfig, rows: int, length: int, dtype=None):
  """Zero response cache {"k", "v"}: [L, rows, K, length, Dh] (compute dtype by default)."""
  dtype = dtype or dtype_from_name(config.dtype)
  shape = (config.num_layers, rows, config.num_kv_heads, length, config.head_dim)
  zeros = sharding.constrain(jnp.zeros(shape, dtype), CACHE, config.axis_rules,
                             "response cache")
  return {"k": zeros, "v": zeros}


def unstack_layers(params):
  """`params` with the stacked layers split into a tuple of per-layer trees (a copy).

  `decode_step` runs the layers of such params one after another instead of under a
  scan. Split once, outside a decode loop: inside a scan each step slices every layer's
  weights out of the stack, and a backend that cannot feed a matmul from a dynamic slice
  in place copies them at every step (XLA:CPU does, yet on a 2-core CPU the copy plus the
  matmul still beat the matmul reading cold weights, so `scan` stays the default; see
  benchmarks/RESULTS.md). The split holds one more copy of the layer weights while
  sampling runs.
  """
  layers = params["layers"]
  if isinstance(layers, (list, tuple)):
    return params
  num_layers = jax.tree.leaves(layers)[0].shape[0]
  split = tuple(jax.tree.map(lambda x, i=i: x[i], layers) for i in range(num_layers))
  return {**params, "layers": split}


def _decode_unrolled(config, params, tokens, inputs: LayerInputs, block):
  """The decode forward of `Decoder` with the layers of `unstack_layers` in a Python loop;
  returns (hidden [N, 1, D], (k, v) [L, N, K, Dh])."""
  dtype, pdtype = dtype_from_name(config.dtype), dtype_from_name(config.param_dtype)
  x = sharding.constrain(jnp.take(params["embedding"], tokens, axis=0).astype(dtype),
                         ACT_EMBED, config.axis_rules, "embedded tokens")
  layer_module = Block(config, "decode", block)
  new_k, new_v = [], []
  for index, layer_params in enumerate(params["layers"]):
    x, (k, v) = layer_module.apply({"params": layer_params}, x, inputs, index)
    new_k.append(k)
    new_v.append(v)
  hidden = RMSNorm(config.norm_eps, pdtype).apply({"params": params["final_norm"]}, x)
  return hidden, (jnp.stack(new_k), jnp.stack(new_v))


def decode_step(config, params, tokens, positions, prompt_cache, prompt_mask,
                response_cache, num_written, *, block=128):
  """One cached token for N = B*G rows (G samples per prompt share its prompt cache).

  Args:
    params: model parameters; with the layers split by `unstack_layers`, the layers run
      one after another, else under a scan.
    tokens, positions: int32 [N, 1], the current token and its RoPE position.
    prompt_cache: from `prefill`, [L, B, K, Lp, Dh]; prompt_mask: bool [B, Lp].
    response_cache: from `init_response_cache`, [L, N, K, Lr, Dh] with Lr a multiple of
      `block`; slots [0, num_written) hold the earlier response tokens of each row.
    num_written: int32 scalar; the current token is written at that slot.
    block: response slots per read; the step reads ceil(num_written / block) blocks.

  Returns:
    (hidden [N, 1, D], response cache with the current token's keys/values written).
  """
  dtype = dtype_from_name(config.dtype)
  # The whole stacked caches go to every layer (broadcast by the scan) with the layer's
  # index as the scanned input: the attention slices out only the blocks it reads.
  caches = {"prompt_k": prompt_cache["k"].astype(dtype),
            "prompt_v": prompt_cache["v"].astype(dtype),
            "response_k": response_cache["k"].astype(dtype),
            "response_v": response_cache["v"].astype(dtype)}
  inputs = LayerInputs(positions=positions, prompt_mask=prompt_mask.astype(bool),
                       num_written=num_written, caches=caches)
  if isinstance(params["layers"], (list, tuple)):
    hidden, (k, v) = _decode_unrolled(config, params, tokens, inputs, block)
  else:
    hidden, (k, v) = Decoder(config, "decode", block).apply(
        {"params": params}, tokens, **inputs._asdict(),
        layers=jnp.arange(config.num_layers, dtype=jnp.int32))

  def write(buffer, new):  # new [L, N, K, Dh] -> slot num_written of [L, N, K, Lr, Dh]
    new = new[:, :, :, None].astype(buffer.dtype)
    return jax.lax.dynamic_update_slice_in_dim(buffer, new, num_written, axis=3)

  return hidden, {"k": write(response_cache["k"], k), "v": write(response_cache["v"], v)}
