"""Saves `transformer` parameters as a Hugging Face checkpoint (Qwen3, Qwen2.5, Llama 3.x).

The directory gets `config.json`, the weights as one `model.safetensors` or as shards
`model-0000i-of-0000n.safetensors` with `model.safetensors.index.json`, and the tokenizer
files of `tokenizer_dir`. Tensors are converted one shard at a time, so the host holds at
most one shard beyond the parameters themselves. `transformers` loads the result with
`AutoModelForCausalLM.from_pretrained`, and `hf_import.load` reads it back exactly.
"""

from __future__ import annotations

import glob
import json
import os
import shutil

import jax
import numpy as np
import safetensors.numpy

from mopd_jax.models import hf_import
from mopd_jax.models import transformer

# Files a Hugging Face tokenizer directory may hold; copied when present.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
)

_MODEL_TYPES = {
    "Qwen3ForCausalLM": "qwen3",
    "Qwen2ForCausalLM": "qwen2",
    "LlamaForCausalLM": "llama",
}
# max_position_embeddings of the published checkpoints of each family.
_DEFAULT_MAX_POSITIONS = {
    "Qwen3ForCausalLM": 40_960,
    "Qwen2ForCausalLM": 32_768,
    "LlamaForCausalLM": 131_072,
}


def _check_architecture(config: transformer.ModelConfig, architecture: str) -> None:
  if architecture not in _MODEL_TYPES:
    raise ValueError(
        f"Architecture {architecture!r} is not supported; supported: {list(_MODEL_TYPES)}."
    )
  want_qk_norm = architecture == "Qwen3ForCausalLM"
  want_bias = architecture == "Qwen2ForCausalLM"
  if config.qk_norm != want_qk_norm or config.qkv_bias != want_bias:
    raise ValueError(
        f"{architecture} needs qk_norm={want_qk_norm} and qkv_bias={want_bias}, but the model "
        f"config has qk_norm={config.qk_norm} and qkv_bias={config.qkv_bias}."
    )


def config_to_hf(
    config: transformer.ModelConfig,
    architecture: str,
    *,
    dtype: str = "float32",
    max_position_embeddings: int | None = None,
) -> dict:
  """The config.json dict of `config` as a Hugging Face `architecture`.

  RoPE settings use the published checkpoints' `rope_theta` / `rope_scaling` fields, which
  both transformers 4 and 5 read.
  """
  _check_architecture(config, architecture)
  rope_scaling = None
  if config.rope_scaling is not None:
    rope_scaling = {
        "rope_type": "llama3",
        "factor": config.rope_scaling.factor,
        "low_freq_factor": config.rope_scaling.low_freq_factor,
        "high_freq_factor": config.rope_scaling.high_freq_factor,
        "original_max_position_embeddings": config.rope_scaling.original_max_position_embeddings,
    }
  hf_config = {
      "architectures": [architecture],
      "model_type": _MODEL_TYPES[architecture],
      "vocab_size": config.vocab_size,
      "hidden_size": config.embed_dim,
      "intermediate_size": config.mlp_dim,
      "num_hidden_layers": config.num_layers,
      "num_attention_heads": config.num_heads,
      "num_key_value_heads": config.num_kv_heads,
      "head_dim": config.head_dim,
      "hidden_act": "silu",
      "max_position_embeddings": max_position_embeddings or _DEFAULT_MAX_POSITIONS[architecture],
      "rms_norm_eps": config.norm_eps,
      "rope_theta": config.rope_theta,
      "rope_scaling": rope_scaling,
      "tie_word_embeddings": config.tie_embeddings,
      "torch_dtype": dtype,
      "attention_dropout": 0.0,
      "use_cache": True,
  }
  if architecture == "LlamaForCausalLM":
    hf_config.update(attention_bias=False, mlp_bias=False)
  else:
    hf_config.update(use_sliding_window=False)
    if architecture == "Qwen3ForCausalLM":
      hf_config.update(attention_bias=False)
  return hf_config


def _leaf(params, spec):
  """The part of our parameters that `spec` names (one layer of a stacked parameter)."""
  for key in spec.path:
    params = params[key]
  return params if spec.layer is None else params[spec.layer]


def _check_params(specs, params) -> None:
  """Params must hold exactly the config's parameters, readable from this process."""
  have = {
      tuple(k.key for k in key_path): leaf
      for key_path, leaf in jax.tree_util.tree_leaves_with_path(params)
  }
  want = {spec.path for spec in specs}
  missing, unexpected = sorted(want - set(have)), sorted(set(have) - want)
  if missing or unexpected:
    raise ValueError(
        f"params do not match the model config: missing {missing}, unexpected {unexpected}."
    )
  for path, leaf in have.items():
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
      raise ValueError(
          f"Parameter {'/'.join(path)} is not fully addressable from this process; gather it "
          "(e.g. with multihost_utils.process_allgather) before saving."
      )


def _plan_shards(specs, params, itemsize: int, max_shard_bytes: int):
  """Groups tensor specs into shards of at most `max_shard_bytes` (a larger tensor alone)."""
  shards, current, current_bytes = [], [], 0
  for spec in specs:
    size = _leaf(params, spec).size * itemsize
    if current and current_bytes + size > max_shard_bytes:
      shards.append(current)
      current, current_bytes = [], 0
    current.append(spec)
    current_bytes += size
  shards.append(current)
  return shards


def _tokenizer_files(tokenizer_dir: str) -> list[str]:
  """Paths of the tokenizer and generation files in `tokenizer_dir` (at least one)."""
  if not os.path.isdir(tokenizer_dir):
    raise FileNotFoundError(f"tokenizer_dir does not exist: {tokenizer_dir}")
  names = [n for n in TOKENIZER_FILES if os.path.isfile(os.path.join(tokenizer_dir, n))]
  names += sorted(os.path.basename(f) for f in glob.glob(os.path.join(tokenizer_dir, "*.model")))
  if not names:
    raise FileNotFoundError(
        f"tokenizer_dir {tokenizer_dir} holds none of {list(TOKENIZER_FILES)} or *.model."
    )
  return [os.path.join(tokenizer_dir, name) for name in names]


def save(
    path: str,
    model_config: transformer.ModelConfig,
    params,
    *,
    architecture: str,
    tokenizer_dir: str | None = None,
    dtype: str = "float32",
    max_shard_bytes: int = 5_000_000_000,
    max_position_embeddings: int | None = None,
) -> None:
  """Writes a Hugging Face checkpoint directory.

  Args:
    path: output directory; created if needed, and must not hold safetensors files yet.
    model_config: the config of `params`.
    params: parameters shaped like `transformer.init_params(model_config)`; device arrays
      must be fully addressable from this process.
    architecture: one of `hf_import.SUPPORTED_ARCHITECTURES`; it must match the config
      (Qwen3: q/k norm, no biases; Qwen2: q/k/v biases, no q/k norm; Llama: neither).
    tokenizer_dir: optional directory whose tokenizer and generation files are copied.
    dtype: dtype of the saved tensors.
    max_shard_bytes: largest shard size in bytes; more than one shard adds an index file.
    max_position_embeddings: written to config.json; defaults to the family's published value.

  Raises:
    ValueError: for an unsupported or mismatching architecture, params that do not match the
      config or are not addressable, or an output directory that already holds weights.
    FileNotFoundError: for a missing tokenizer_dir or one without tokenizer files.
  """
  hf_config = config_to_hf(
      model_config, architecture, dtype=dtype, max_position_embeddings=max_position_embeddings
  )
  if max_shard_bytes <= 0:
    raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}.")
  tokenizer_files = [] if tokenizer_dir is None else _tokenizer_files(tokenizer_dir)
  specs = hf_import.tensor_specs(model_config)
  _check_params(specs, params)
  np_dtype = np.dtype(transformer.dtype_from_name(dtype))
  os.makedirs(path, exist_ok=True)
  existing = sorted(glob.glob(os.path.join(path, "*.safetensors*")))
  if existing:
    raise ValueError(f"Output directory {path} already holds weights: {existing}")

  shards = _plan_shards(specs, params, np_dtype.itemsize, max_shard_bytes)
  weight_map, total_bytes = {}, 0
  for i, shard in enumerate(shards):
    name = (
        hf_import.SINGLE_FILE
        if len(shards) == 1
        else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    )
    tensors = {}
    for spec in shard:
      array = np.asarray(jax.device_get(_leaf(params, spec))).astype(np_dtype, copy=False)
      tensors[spec.hf_name] = hf_import.to_hf(spec.layout, array)
      weight_map[spec.hf_name] = name
      total_bytes += array.nbytes
    safetensors.numpy.save_file(tensors, os.path.join(path, name), metadata={"format": "pt"})
  if len(shards) > 1:
    with open(os.path.join(path, hf_import.INDEX_FILE), "w") as f:
      json.dump({"metadata": {"total_size": total_bytes}, "weight_map": weight_map}, f, indent=2)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(hf_config, f, indent=2)
  for file in tokenizer_files:
    shutil.copyfile(file, os.path.join(path, os.path.basename(file)))
