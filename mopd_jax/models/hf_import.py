"""Loads Hugging Face checkpoints (Qwen3, Qwen2.5, Llama 3.x) into `transformer` parameters.

A checkpoint is a local directory with `config.json` and either one `*.safetensors` file or
shards listed in `model.safetensors.index.json`. On a mesh, each parameter is created with
`jax.make_array_from_callback` on the sharding that the logical axis rules give it: each
process reads, for each of its devices' shards, only the part of the Hugging Face tensor(s)
that covers the shard (memory-mapped, so only those bytes are read), rearranges it into our
layout and hands it to that device. No process reads the whole model, unless its devices
hold all of it. Without a mesh, tensors are read whole, one at a time, and placed on the
default device. `load(..., stats=dict)` reports the bytes read.

Layout of a Hugging Face linear layer `weight [out, in]` in ours:
- q/k/v projections: kernel [embed, heads, head_dim] = weight.T reshaped; bias [heads, head_dim].
- o projection: kernel [heads, head_dim, embed] = weight.T reshaped.
- MLP and untied LM head: kernel = weight.T. Embedding and norm scales are unchanged.
Per-layer tensors `model.layers.{i}.*` are stacked: they fill index i of the leading
`layers` axis of our parameter (e.g. params["layers"]["attn"]["q_proj"]["kernel"][i]).

The mapping table (`tensor_specs`) and the config translation are shared with `hf_export`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Iterator

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from mopd_jax import sharding as sharding_lib
from mopd_jax.models import transformer

SUPPORTED_ARCHITECTURES = ("Qwen3ForCausalLM", "Qwen2ForCausalLM", "LlamaForCausalLM")
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

# Hugging Face class defaults for fields that a config.json may leave out.
_QWEN3_DEFAULT_HEAD_DIM = 128
_DEFAULT_ROPE_THETA = 10_000.0
_DEFAULT_RMS_NORM_EPS = 1e-6

# Layouts: how a Hugging Face tensor maps onto one of our parameters.
SAME = "same"  # identical shape and element order
TRANSPOSE = "transpose"  # [out, in] -> [in, out]
HEADS_IN = "heads_in"  # [heads * head_dim, embed] -> [embed, heads, head_dim]
HEADS_BIAS = "heads_bias"  # [heads * head_dim] -> [heads, head_dim]
HEADS_OUT = "heads_out"  # [embed, heads * head_dim] -> [heads, head_dim, embed]

# Numpy dtypes of the safetensors dtype codes that checkpoints of these models use.
_SAFETENSORS_DTYPES = {
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(jnp.bfloat16),
}


@dataclasses.dataclass(frozen=True)
class TensorSpec:
  """One checkpoint tensor: its Hugging Face name and where it lives in our parameters."""

  hf_name: str
  path: tuple[str, ...]  # keys into the nested parameter dict
  layout: str
  layer: int | None = None  # index into the leading `layers` axis; None = not stacked


def tensor_specs(config: transformer.ModelConfig) -> list[TensorSpec]:
  """Every checkpoint tensor of `config`, in the order Hugging Face writes them."""
  specs = [TensorSpec("model.embed_tokens.weight", ("embedding",), SAME)]
  for i in range(config.num_layers):
    hf = f"model.layers.{i}"

    def add(name, path, layout, hf=hf, i=i):
      specs.append(TensorSpec(f"{hf}.{name}", ("layers",) + path, layout, i))

    for proj in ("q_proj", "k_proj", "v_proj"):
      add(f"self_attn.{proj}.weight", ("attn", proj, "kernel"), HEADS_IN)
      if config.qkv_bias:
        add(f"self_attn.{proj}.bias", ("attn", proj, "bias"), HEADS_BIAS)
    add("self_attn.o_proj.weight", ("attn", "o_proj", "kernel"), HEADS_OUT)
    if config.qk_norm:
      for norm in ("q_norm", "k_norm"):
        add(f"self_attn.{norm}.weight", ("attn", norm, "scale"), SAME)
    for proj in ("gate_proj", "up_proj", "down_proj"):
      add(f"mlp.{proj}.weight", ("mlp", proj, "kernel"), TRANSPOSE)
    add("input_layernorm.weight", ("input_norm", "scale"), SAME)
    add("post_attention_layernorm.weight", ("post_attn_norm", "scale"), SAME)
  specs.append(TensorSpec("model.norm.weight", ("final_norm", "scale"), SAME))
  if not config.tie_embeddings:
    specs.append(TensorSpec("lm_head.weight", ("lm_head",), TRANSPOSE))
  return specs


def tensor_shape(spec: TensorSpec, param_shape: tuple[int, ...]) -> tuple[int, ...]:
  """Shape of the part of our parameter that `spec` fills (one layer of a stacked one)."""
  return tuple(param_shape[1:] if spec.layer is not None else param_shape)


def hf_shape(layout: str, shape: tuple[int, ...]) -> tuple[int, ...]:
  """Shape of the Hugging Face tensor for one of our parameters of `shape`."""
  if layout == SAME:
    return tuple(shape)
  if layout == TRANSPOSE:
    return tuple(reversed(shape))
  if layout == HEADS_IN:
    embed, heads, head_dim = shape
    return (heads * head_dim, embed)
  if layout == HEADS_BIAS:
    return (math.prod(shape),)
  if layout == HEADS_OUT:
    heads, head_dim, embed = shape
    return (embed, heads * head_dim)
  raise ValueError(f"Unknown tensor layout {layout!r}.")


def to_ours(layout: str, array: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
  """Rearranges a Hugging Face tensor into our parameter of `shape`."""
  if layout in (SAME, HEADS_BIAS):
    return array.reshape(shape)
  return np.ascontiguousarray(array.T).reshape(shape)


def to_hf(layout: str, array: np.ndarray) -> np.ndarray:
  """Rearranges one of our parameters into its Hugging Face tensor (inverse of `to_ours`)."""
  shape = hf_shape(layout, array.shape)
  if layout in (SAME, HEADS_BIAS):
    return array.reshape(shape)
  return np.ascontiguousarray(array.reshape(shape[::-1]).T)


def _required(hf_config: dict, key: str, source: str):
  if key not in hf_config:
    raise ValueError(f"{source} has no {key!r}, which the model config needs.")
  return hf_config[key]


def _rope_settings(hf_config: dict, source: str):
  """(theta, Llama3RopeScaling or None) from either config.json convention.

  transformers >= 5 writes `rope_parameters` (with `rope_theta` inside); published
  checkpoints write `rope_theta` and `rope_scaling` (with `rope_type` or `type`).
  """
  rope = hf_config.get("rope_parameters") or hf_config.get("rope_scaling") or {}
  theta = float(rope.get("rope_theta", hf_config.get("rope_theta", _DEFAULT_ROPE_THETA)))
  rope_type = rope.get("rope_type", rope.get("type", "default"))
  if rope_type == "default":
    return theta, None
  if rope_type == "llama3":
    keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    missing = [k for k in keys if k not in rope]
    if missing:
      raise ValueError(f"{source}: llama3 RoPE scaling lacks {missing}; it has {sorted(rope)}.")
    return theta, transformer.Llama3RopeScaling(
        factor=float(rope["factor"]),
        low_freq_factor=float(rope["low_freq_factor"]),
        high_freq_factor=float(rope["high_freq_factor"]),
        original_max_position_embeddings=int(rope["original_max_position_embeddings"]),
    )
  raise ValueError(
      f"{source}: RoPE type {rope_type!r} is not supported; supported: 'default', 'llama3'."
  )


def config_from_hf(
    hf_config: dict[str, Any], *, dtype: str = "float32", source: str = "config.json"
) -> transformer.ModelConfig:
  """Translates a Hugging Face config.json dict into a `transformer.ModelConfig`.

  Args:
    hf_config: the parsed config.json.
    dtype: parameter and compute dtype of the returned config.
    source: how to name the config in error messages.

  Returns:
    The model config; its `param_dtype` and `dtype` are both `dtype`.

  Raises:
    ValueError: for an unsupported architecture or setting, or a missing field.
  """
  architectures = hf_config.get("architectures") or []
  if len(architectures) != 1 or architectures[0] not in SUPPORTED_ARCHITECTURES:
    raise ValueError(
        f"{source}: architecture {architectures!r} is not supported; supported: "
        f"{list(SUPPORTED_ARCHITECTURES)}."
    )
  arch = architectures[0]
  if hf_config.get("hidden_act", "silu") != "silu":
    raise ValueError(f"{source}: hidden_act {hf_config['hidden_act']!r} is not supported (silu).")
  if hf_config.get("use_sliding_window"):
    raise ValueError(f"{source}: use_sliding_window=true is not supported.")
  for key in ("attention_bias", "mlp_bias"):
    if arch != "Qwen2ForCausalLM" and hf_config.get(key):
      raise ValueError(f"{source}: {key}=true is not supported for {arch}.")
  hidden = int(_required(hf_config, "hidden_size", source))
  heads = int(_required(hf_config, "num_attention_heads", source))
  default_head_dim = _QWEN3_DEFAULT_HEAD_DIM if arch == "Qwen3ForCausalLM" else hidden // heads
  theta, scaling = _rope_settings(hf_config, source)
  return transformer.ModelConfig(
      vocab_size=int(_required(hf_config, "vocab_size", source)),
      num_layers=int(_required(hf_config, "num_hidden_layers", source)),
      embed_dim=hidden,
      num_heads=heads,
      num_kv_heads=int(hf_config.get("num_key_value_heads") or heads),
      head_dim=int(hf_config.get("head_dim") or default_head_dim),
      mlp_dim=int(_required(hf_config, "intermediate_size", source)),
      rope_theta=theta,
      norm_eps=float(hf_config.get("rms_norm_eps", _DEFAULT_RMS_NORM_EPS)),
      qk_norm=arch == "Qwen3ForCausalLM",
      qkv_bias=arch == "Qwen2ForCausalLM",
      tie_embeddings=bool(hf_config.get("tie_word_embeddings", False)),
      param_dtype=dtype,
      dtype=dtype,
      rope_scaling=scaling,
  )


def read_config(path: str, *, dtype: str = "float32") -> transformer.ModelConfig:
  """The `ModelConfig` of the checkpoint directory `path` (reads config.json only)."""
  config_path = os.path.join(path, "config.json")
  if not os.path.isfile(config_path):
    raise FileNotFoundError(f"No config.json in the checkpoint directory: {config_path}")
  with open(config_path) as f:
    return config_from_hf(json.load(f), dtype=dtype, source=config_path)


def _checkpoint_files(path: str) -> list[str]:
  """Paths of the safetensors files of the checkpoint, from the index if there is one."""
  index_path = os.path.join(path, INDEX_FILE)
  if os.path.isfile(index_path):
    with open(index_path) as f:
      weight_map = json.load(f).get("weight_map")
    if not weight_map:
      raise ValueError(f"{index_path} has no 'weight_map'.")
    files = [os.path.join(path, name) for name in sorted(set(weight_map.values()))]
    for file in files:
      if not os.path.isfile(file):
        raise FileNotFoundError(f"Shard listed in {index_path} does not exist: {file}")
    return files
  single = os.path.join(path, SINGLE_FILE)
  if os.path.isfile(single):
    return [single]
  found = sorted(n for n in os.listdir(path) if n.endswith(".safetensors"))
  if len(found) == 1:
    return [os.path.join(path, found[0])]
  raise FileNotFoundError(
      f"No {SINGLE_FILE} or {INDEX_FILE} in {path} (safetensors files there: {found})."
  )


def read_header(file: str) -> tuple[dict[str, Any], int]:
  """(tensor entries of the safetensors header, byte offset where the data starts)."""
  with open(file, "rb") as f:
    size = int.from_bytes(f.read(8), "little")
    header = json.loads(f.read(size))
  header.pop("__metadata__", None)
  return header, 8 + size


def _read_part(where, name: str, index: tuple) -> np.ndarray:
  """The part `index` (one slice per axis) of checkpoint tensor `name`, as numpy.

  The file is memory-mapped and only the requested elements are copied out, so only their
  pages are read. (The numpy API of safetensors cannot return bfloat16, numpy having no
  such dtype; the header's offsets and `ml_dtypes`' bfloat16 serve every dtype alike.)
  """
  file, entry, data_start = where[name]
  begin, end = entry["data_offsets"]
  dtype, shape = _SAFETENSORS_DTYPES[entry["dtype"]], tuple(entry["shape"])
  if begin == end:  # an empty tensor: nothing to map
    return np.zeros(shape, dtype)[index]
  data = np.memmap(file, dtype=dtype, mode="r", offset=data_start + begin, shape=shape)
  return np.array(data[index])


def _ours_part(layout: str, read, index: tuple, shape: tuple[int, ...]) -> np.ndarray:
  """The part `index` of our (unstacked) parameter of `shape`, as `to_ours` would give it.

  `read(hf_index)` returns a part of the Hugging Face tensor. The part read is the smallest
  block that covers `index`: for a split head_dim it is the whole heads, sliced afterwards.
  """
  index = tuple(slice(*s.indices(n)[:2]) for s, n in zip(index, shape))
  if layout == SAME:
    return read(index)
  if layout == TRANSPOSE:
    return np.ascontiguousarray(read(index[::-1]).T)
  if layout == HEADS_BIAS:
    heads, dims = index
    head_dim = shape[1]
    rows = slice(heads.start * head_dim, heads.stop * head_dim)
    return np.ascontiguousarray(read((rows,)).reshape(-1, head_dim)[:, dims])
  if layout == HEADS_IN:  # ours [embed, heads, head_dim]; Hugging Face [heads * head_dim, embed]
    embed, heads, dims = index
    head_dim = shape[2]
    part = read((slice(heads.start * head_dim, heads.stop * head_dim), embed))
    return np.ascontiguousarray(part.T.reshape(part.shape[1], -1, head_dim)[:, :, dims])
  if layout == HEADS_OUT:  # ours [heads, head_dim, embed]; Hugging Face [embed, heads * head_dim]
    heads, dims, embed = index
    head_dim = shape[1]
    part = read((embed, slice(heads.start * head_dim, heads.stop * head_dim)))
    return np.ascontiguousarray(part.T.reshape(-1, head_dim, part.shape[0])[:, dims, :])
  raise ValueError(f"Unknown tensor layout {layout!r}.")


def _index_tensors(files: list[str]) -> dict[str, tuple[str, dict[str, Any], int]]:
  """Tensor name -> (file, header entry, data start) over all files, headers only."""
  where = {}
  for file in files:
    header, data_start = read_header(file)
    for name, entry in header.items():
      if name in where:
        raise ValueError(f"Tensor {name!r} appears in both {where[name][0]} and {file}.")
      if entry["dtype"] not in _SAFETENSORS_DTYPES:
        raise ValueError(
            f"Tensor {name!r} in {file} has dtype {entry['dtype']}; supported: "
            f"{sorted(_SAFETENSORS_DTYPES)}."
        )
      where[name] = (file, entry, data_start)
  return where


def _check_keys_and_shapes(specs, target_shapes, where, path: str, tie_embeddings: bool):
  expected = {spec.hf_name for spec in specs}
  missing = sorted(expected - set(where))
  if missing:
    raise ValueError(f"Checkpoint {path} lacks {len(missing)} tensors: {missing}")
  # A tied checkpoint may still store the (identical) LM head; it is not needed.
  ignored = {"lm_head.weight"} if tie_embeddings else set()
  unknown = sorted(set(where) - expected - ignored)
  if unknown:
    raise ValueError(
        f"Checkpoint {path} has {len(unknown)} tensors that the model config does not use: "
        f"{unknown}"
    )
  for spec in specs:
    file, entry, _ = where[spec.hf_name]
    want = hf_shape(spec.layout, tensor_shape(spec, target_shapes[spec.path]))
    if tuple(entry["shape"]) != want:
      raise ValueError(
          f"Tensor {spec.hf_name!r} in {file} has shape {tuple(entry['shape'])}, but config.json "
          f"implies {want}."
      )


def _flat_leaves(tree, prefix=()) -> Iterator[tuple[tuple[str, ...], Any]]:
  for key, value in tree.items():
    if isinstance(value, dict):
      yield from _flat_leaves(value, prefix + (key,))
    else:
      yield prefix + (key,), value


def _set_leaf(tree: dict, path: tuple[str, ...], value) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def load(path: str, *, dtype: str = "float32", mesh=None, rules=None, stats=None):
  """Loads a Hugging Face checkpoint directory.

  Args:
    path: directory with `config.json` and `model.safetensors` or sharded safetensors files
      with `model.safetensors.index.json`.
    dtype: dtype of the returned parameters (and of the config's compute dtype).
    mesh: optional `jax.sharding.Mesh`; each parameter is then created on the NamedSharding
      that `rules` give its logical axes, and this process reads only the parts of the
      tensors that its devices hold. Without a mesh, parameters go to the default device.
    rules: logical axis rules; defaults to `sharding.DEFAULT_RULES`.
    stats: optional dict that receives {"bytes_read": bytes this process read from the
      files, "checkpoint_bytes": bytes of all the tensors the model uses}.

  Returns:
    (model_config, params) with `params` shaped like `transformer.init_params(model_config)`.

  Raises:
    FileNotFoundError: for a missing config.json or safetensors file.
    ValueError: for an unsupported architecture, missing or unused tensors, or a tensor whose
      shape does not match the config.
  """
  config = read_config(path, dtype=dtype)
  files = _checkpoint_files(path)
  target_dtype = np.dtype(transformer.dtype_from_name(dtype))
  shapes = jax.eval_shape(lambda: transformer.init_params(config, jax.random.key(0)))
  target_shapes = {p: tuple(s.shape) for p, s in _flat_leaves(shapes)}
  specs = tensor_specs(config)
  where = _index_tensors(files)
  _check_keys_and_shapes(specs, target_shapes, where, path, config.tie_embeddings)

  counts = {"bytes_read": 0, "checkpoint_bytes": sum(
      where[s.hf_name][1]["data_offsets"][1] - where[s.hf_name][1]["data_offsets"][0]
      for s in specs)}

  def read(name, index):
    part = _read_part(where, name, index)
    counts["bytes_read"] += part.nbytes
    return part.astype(target_dtype, copy=False)

  by_path = {}  # parameter path -> its specs (one per layer for a stacked parameter)
  for spec in specs:
    by_path.setdefault(spec.path, []).append(spec)

  def part(leaf, index):
    """Our parameter `leaf`'s part `index`: the layers it names, each read in part."""
    shape, path_specs = target_shapes[leaf], by_path[leaf]
    if path_specs[0].layer is None:
      spec, = path_specs
      return _ours_part(spec.layout, lambda i: read(spec.hf_name, i), index, shape)
    layers = range(*index[0].indices(shape[0]))
    return np.stack([
        _ours_part(path_specs[i].layout, lambda j, i=i: read(path_specs[i].hf_name, j),
                   index[1:], shape[1:]) for i in layers])

  params = {}
  if mesh is None:
    for leaf in by_path:
      full = tuple(slice(None) for _ in target_shapes[leaf])
      _set_leaf(params, leaf, jax.device_put(part(leaf, full)))
  else:
    shardings = dict(_flat_leaves(sharding_lib.logical_to_shardings(
        transformer.param_logical_axes(config), shapes, mesh,
        sharding_lib.DEFAULT_RULES if rules is None else rules)))
    for leaf in by_path:
      parts = {}  # devices that hold the same part share one read

      def callback(index, leaf=leaf, parts=parts):
        key = tuple(s.indices(n)[:2] for s, n in zip(index, target_shapes[leaf]))
        if key not in parts:
          parts[key] = part(leaf, index)
        return parts[key]

      _set_leaf(params, leaf, jax.make_array_from_callback(
          target_shapes[leaf], shardings[leaf], callback))
  logging.info("Read %.1f MB of the %.1f MB of checkpoint tensors in %s.",
               counts["bytes_read"] / 1e6, counts["checkpoint_bytes"] / 1e6, path)
  if stats is not None:
    stats.update(counts)
  return config, params
