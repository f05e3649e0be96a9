"""Per-device memory plan of a run, made before the training state exists.

The fused step is lowered and compiled from abstract shapes (with their shardings), so
XLA's memory analysis gives the step's temporary memory before the optimizer state and
the teacher are allocated (and, in `benchmarks.step_memory`, without any weight at all). The plan adds the persistent state per device:

    parameters      sum over leaves of the shard size (sharding.shard_shape)
    optimizer state AdamW: two moments of the parameters' shape, plus a step count
    teacher         float32 copy of the student (self-teacher) or the external model
    KV cache        layers x 2 (K, V) x kv_heads x head_dim x (B x Lp + N x Lr) x bytes
                    (prompt KV stored once per prompt, responses per rollout), rows
                    split over the data x fsdp devices (data only in the 'wide' decode
                    layout), key/value heads over the tensor devices that divide them
                    (`kv_cache_split`); it lives inside the step's temporary memory
    decode weights  the sampler's compute-dtype copy of the weights in its decode layout
                    (`config.sampling.decode_layout`: 'tensor' = split over tensor only,
                    `sharding.DECODE_RULES`; 'wide' = split over tensor and fsdp,
                    `sharding.WIDE_DECODE_RULES`; 'train' = the training layout, a copy
                    only where the parameters are wider than the compute dtype); also
                    inside the temporary memory
    temporary       compiled.memory_analysis().temp_size_in_bytes

and compares the total with the device's memory limit where the backend reports one
(GPU and TPU do; a CPU does not, and the check is then skipped with a log line). For the
TPU devices of a topology compiled for ahead of time, the limit is the chip's HBM.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import numpy as np

from mopd_jax import sharding, topology
from mopd_jax.models import transformer


def tree_bytes_per_device(shapes, shardings=None) -> int:
  """Bytes one device holds of a pytree of arrays / ShapeDtypeStructs.

  shardings: a matching pytree of shardings; default: each leaf's own `.sharding`
  (replicated when it has none).
  """
  leaves = jax.tree.leaves(shapes)
  shard_leaves = (jax.tree.leaves(shardings) if shardings is not None
                  else [getattr(x, "sharding", None) for x in leaves])
  total = 0
  for x, s in zip(leaves, shard_leaves):
    shape = tuple(x.shape) if s is None else tuple(s.shard_shape(tuple(x.shape)))
    total += math.prod(shape) * np.dtype(x.dtype).itemsize
  return total


def kv_cache_bytes(model: transformer.ModelConfig, *, prompts: int, rows: int,
                   prompt_len: int, response_len: int, batch_devices: int,
                   head_devices: int = 1) -> int:
  """Per-device bytes of the sampler's KV cache (see the module docstring), its rows
  split over `batch_devices` and its key/value heads over `head_devices`."""
  per_token = (model.num_layers * 2 * model.num_kv_heads * model.head_dim
               * np.dtype(transformer.dtype_from_name(model.dtype)).itemsize)
  tokens = prompts * prompt_len + rows * response_len
  return per_token * tokens // max(batch_devices, 1) // max(head_devices, 1)


def kv_cache_split(model: transformer.ModelConfig, mesh, layout: str) -> dict[str, int]:
  """{'batch_devices', 'head_devices'} of the KV cache in the sampler's `layout`: the
  sizes of the mesh axes its rows and its key/value heads are split over (by
  `sharding.logical_spec`, which keeps heads replicated over the part of their mesh axes
  that does not divide them)."""
  rules = sharding.DECODE_LAYOUT_RULES.get(layout, sharding.DEFAULT_RULES)
  # Rows: any multiple of the mesh size divides. `mesh` may be an AbstractMesh.
  with jax.sharding.use_abstract_mesh(getattr(mesh, "abstract_mesh", mesh)):
    spec = sharding.logical_spec((mesh.size, model.num_kv_heads),
                                 ("cache_batch", "cache_heads"), rules, "KV cache")
  return {"batch_devices": sharding.axis_size(mesh, spec[0]),
          "head_devices": sharding.axis_size(mesh, spec[1])}


def decode_weight_bytes(model: transformer.ModelConfig, param_shapes, mesh,
                        layout: str) -> int:
  """Per-device bytes of the sampler's copy of the weights (see the module docstring)."""
  compute = np.dtype(transformer.dtype_from_name(model.dtype))
  narrow = lambda x: np.dtype(x.dtype).itemsize > compute.itemsize  # noqa: E731
  if layout == "train" and not any(narrow(x) for x in jax.tree.leaves(param_shapes)):
    return 0  # the sampler reads the parameters themselves
  rules = sharding.DECODE_LAYOUT_RULES.get(layout, sharding.DEFAULT_RULES)
  shardings = sharding.logical_to_shardings(transformer.param_logical_axes(model),
                                            param_shapes, mesh, rules)
  shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(
      x.shape, compute if narrow(x) else x.dtype), param_shapes)
  return tree_bytes_per_device(shapes, shardings)


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
  params: int
  opt_state: int
  teacher: int
  kv_cache: int  # estimate; part of `temp`
  temp: int
  argument: int
  output: int
  device_limit: int | None
  device_kind: str
  decode_weights: int = 0  # estimate; part of `temp`
  decode_layout: str = "tensor"

  @property
  def total(self) -> int:
    """Peak estimate: the step's arguments (the whole state and batch) + its temporaries.

    The state is donated, so the outputs reuse the arguments' buffers.
    """
    return self.argument + self.temp

  def as_dict(self) -> dict[str, Any]:
    return {**dataclasses.asdict(self), "total": self.total}

  def table(self) -> str:
    gib = lambda b: f"{b / 2**30:8.2f} GiB"  # noqa: E731
    rows = [("parameters", self.params), ("optimizer state", self.opt_state),
            ("teacher", self.teacher), ("KV cache (in temporary)", self.kv_cache),
            ("decode weights (in temporary)", self.decode_weights),
            ("step temporary", self.temp), ("step arguments", self.argument),
            ("total (arguments + temporary)", self.total)]
    lines = [f"Memory plan per device ({self.device_kind}):"]
    lines += [f"  {name:<30s}{gib(value)}" for name, value in rows]
    lines.append(f"  {'decode layout':<30s}    {self.decode_layout}")
    lines.append("  device limit                  " + (
        gib(self.device_limit) if self.device_limit else "    unknown (not reported)"))
    return "\n".join(lines)

  def fits(self) -> bool:
    return self.device_limit is None or self.total <= self.device_limit


def device_memory_limit(device) -> int | None:
  """The device's memory limit in bytes, or None where the backend reports none.

  A TPU device this process cannot address (one of a topology compiled for ahead of time)
  reports nothing; its limit is its share of the chip's HBM (`topology.hbm_bytes`).
  """
  try:
    stats = device.memory_stats()
  except Exception:  # pylint: disable=broad-except
    stats = None  # some backends raise instead of returning None
  if stats and stats.get("bytes_limit"):
    return stats["bytes_limit"]
  return topology.hbm_bytes(device) if device.platform == "tpu" else None


def make_plan(compiled, state_shapes, state_shardings, kv_bytes: int, device, *,
              decode_weights: int = 0, decode_layout: str = "tensor") -> MemoryPlan:
  """The plan of a compiled step whose state has `state_shapes` on `state_shardings`;
  `decode_weights` from `decode_weight_bytes` for the sampler's `decode_layout`."""
  stats = compiled.memory_analysis()
  per = lambda field: tree_bytes_per_device(  # noqa: E731
      getattr(state_shapes, field), getattr(state_shardings, field))
  return MemoryPlan(
      params=per("params"), opt_state=per("opt_state"), teacher=per("teacher_params"),
      kv_cache=kv_bytes,
      temp=int(stats.temp_size_in_bytes) if stats is not None else 0,
      argument=int(stats.argument_size_in_bytes) if stats is not None else 0,
      output=int(stats.output_size_in_bytes) if stats is not None else 0,
      device_limit=device_memory_limit(device), device_kind=device.device_kind,
      decode_weights=decode_weights, decode_layout=decode_layout)


SHRINKING_KNOBS = (
    "config.optim.micro_batch_rows (fewer rows live at once), config.mesh.shape (more "
    "fsdp devices split parameters and optimizer state), config.model.remat_policy "
    "(save fewer activations), config.loss.chunk_size, config.sampling.decode_layout = "
    "'wide' or 'train' (a smaller or no copy of the weights while sampling), and the lengths "
    "config.data.max_prompt_len, config.sampling.max_response_len, config.peers.peer_cap.")


def check_fits(plan: MemoryPlan, error_cls=ValueError):
  """Raises `error_cls` naming the knobs that shrink a step that does not fit."""
  if plan.fits():
    return
  raise error_cls(
      f"The step needs about {plan.total / 2**30:.1f} GiB per device (arguments "
      f"{plan.argument / 2**30:.1f} GiB + temporary {plan.temp / 2**30:.1f} GiB) but the "
      f"{plan.device_kind} has {plan.device_limit / 2**30:.1f} GiB. Knobs that shrink it: "
      f"{SHRINKING_KNOBS}\n{plan.table()}")
