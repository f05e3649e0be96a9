"""Device mesh, logical axis rules and the shardings of parameters, state and batches.

Mesh axes are `('data', 'fsdp', 'tensor')`. Model parameters carry logical axis names;
one ordered rule list maps each name to a mesh axis (or to None = replicated). Batches
are split over ('data', 'fsdp'). Teacher parameters use the student's rules.

Activations and the KV cache carry their own logical names (`activation_*`, `cache_*`).
The rule list that maps them is part of the model's static config
(`ModelConfig.axis_rules`), so it is in the cache key of every jit that closes over the
config or takes it as a static argument; `constrain(x, axes, rules)` turns the names into
a sharding constraint on the context mesh (`jax.set_mesh`, which `UnderMesh` enters around
a jitted function). A config without rules (None) constrains nothing, on purpose (one
device); a config with rules traced without a context mesh is an error, so constraints
cannot silently vanish.

Two layouts per step: the training layout (`DEFAULT_RULES`: weights split over fsdp and
tensor) and the sampler's decode layout (`DECODE_RULES`: weights split over tensor only,
replicated over the batch axes, which split the rows; or, where that copy does not fit,
`WIDE_DECODE_RULES`: weights split over tensor and fsdp together, rows over data only).
The sampler traces with a copy of the model config that holds the decode rules, and
`constrain_tree` reshards its weights into that layout once per call, so the decode loop
reads its weights where they are.

The device order comes from `jax.experimental.mesh_utils` (topology-aware on TPU and GPU);
with a DCN shape the mesh is a hybrid one: `shape` within each slice (or process), the
DCN shape across them. On many processes each process holds a contiguous block of every
batch's rows (`process_rows`) and builds only that block; `global_batch` assembles the
global arrays with `jax.make_array_from_process_local_data`.
"""

from __future__ import annotations

import collections
import math
from typing import Sequence

from absl import logging

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

DEFAULT_RULES = (
    # Parameters.
    ("layers", None),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("head_dim", None),
    # Activations.
    ("activation_batch", BATCH_AXES),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_kv_heads", "tensor"),
    ("activation_kv", None),
    ("activation_mlp", "tensor"),
    ("activation_vocab", "tensor"),
    # KV cache of the sampler.
    ("cache_batch", BATCH_AXES),
    ("cache_sequence", None),
    ("cache_heads", "tensor"),
    ("cache_kv", None),
)

# The sampler's decode layout: as DEFAULT_RULES, but no parameter dimension is split over
# the batch axes. A decode step reads every weight once per generated token; with weights
# split over fsdp each step would gather them all over the interconnect, with this layout
# the step reads its local copy and only the tensor-parallel activations communicate.
DECODE_RULES = tuple((name, None) if name == "embed" else (name, axes)
                     for name, axes in DEFAULT_RULES)

# The fallback decode layout for a model whose copy split over 'tensor' alone does not fit
# (`decode_layout = "wide"`): tensor parallelism over ('tensor', 'fsdp') together. Every
# weight dimension that `DECODE_RULES` splits over 'tensor' is split over both axes, so the
# copy costs 1 / (tensor x fsdp) of the weights per device, and the rows are split over
# 'data' only (every device of a tensor x fsdp group decodes the same rows, each with its
# share of the heads and of the MLP width). A decode step still reads no remote weight;
# it pays tensor-parallel activation reductions over the wider group, and the KV cache is
# split by rows over 'data' and by key/value heads over as much of the group as divides
# them (`REPLICABLE`), so per device it can be larger than in the 'tensor' layout.
_WIDE = ("tensor", "fsdp")
WIDE_DECODE_RULES = tuple(
    (name, None) if name == "embed"
    else (name, "data") if name in ("activation_batch", "cache_batch")
    else (name, _WIDE) if axes == "tensor"
    else (name, axes)
    for name, axes in DEFAULT_RULES)

# The rules of each decode layout that reshards the weights (`sampling.Sampler`).
DECODE_LAYOUT_RULES = {"tensor": DECODE_RULES, "wide": WIDE_DECODE_RULES}

# Logical axes that may stay replicated where their mesh axes do not divide them: key /
# value heads (e.g. 2 of them over a tensor axis of 4) are read by every query head of
# their group, and a copy per device is what grouped-query attention needs there. Such an
# axis is split over the longest leading part of its mesh axes that divides it (8 heads
# over ('tensor', 'fsdp') of sizes 4 and 8: over 'tensor'), replicated over the rest. Any
# other logical axis that does not divide is an error.
REPLICABLE = frozenset({"kv_heads", "activation_kv_heads", "cache_heads"})

# (logical axis, dimension, mesh axes, mesh size) -> number of traces that replicated it.
REPLICATED = collections.Counter()


def check_rules(rules) -> tuple:
  """`rules` as a hashable tuple of (logical name, mesh axes) pairs (lists, e.g. read back
  from JSON, become tuples); an error names an entry that is not such a pair."""
  checked = []
  for entry in rules:
    if (not isinstance(entry, (tuple, list)) or len(entry) != 2
        or not isinstance(entry[0], str)):
      raise ValueError(f"axis rule {entry!r} is not a (logical name, mesh axes) pair.")
    name, axes = entry
    if isinstance(axes, list):
      axes = tuple(axes)
    names = axes if isinstance(axes, tuple) else (axes,)
    if any(a is not None and a not in MESH_AXES for a in names):
      raise ValueError(f"axis rule {entry!r} names a mesh axis outside {MESH_AXES}.")
    checked.append((name, axes))
  return tuple(checked)


def resolve_mesh_shape(shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
  """Replaces one -1 by the remaining devices; checks the product."""
  shape = tuple(int(s) for s in shape)
  if len(shape) != len(MESH_AXES):
    raise ValueError(f"mesh shape must have {len(MESH_AXES)} entries {MESH_AXES}, "
                     f"got {shape}.")
  if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
    raise ValueError(f"mesh shape {shape} may hold positive sizes and at most one -1.")
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if num_devices % known:
      raise ValueError(f"mesh shape {shape} does not divide {num_devices} devices.")
    shape = tuple(num_devices // known if s == -1 else s for s in shape)
  if math.prod(shape) != num_devices:
    raise ValueError(f"mesh shape {shape} needs {math.prod(shape)} devices, "
                     f"but {num_devices} are available.")
  return shape


def make_mesh(shape: Sequence[int] = (1, 1, -1), devices=None, *,
              dcn_shape: Sequence[int] = (1, 1, 1)) -> Mesh:
  """A ('data', 'fsdp', 'tensor') mesh over `devices` (default: all devices).

  dcn_shape: sizes across slices (TPU multi-slice) or processes (elsewhere); with a
  product above 1 the mesh is `mesh_utils.create_hybrid_device_mesh(shape, dcn_shape)`
  and `shape` (one -1 allowed) is the shape within one slice or process.
  """
  devices = list(devices if devices is not None else jax.devices())
  dcn_shape = tuple(int(s) for s in dcn_shape)
  if len(dcn_shape) != len(MESH_AXES) or any(s < 1 for s in dcn_shape):
    raise ValueError(f"dcn shape must hold {len(MESH_AXES)} positive sizes {MESH_AXES}, "
                     f"got {dcn_shape}.")
  granules = math.prod(dcn_shape)
  if granules == 1:
    shape = resolve_mesh_shape(shape, len(devices))
    return Mesh(mesh_utils.create_device_mesh(shape, devices,
                                              allow_split_physical_axes=True), MESH_AXES)
  by_slice = hasattr(devices[0], "slice_index")
  groups = {d.slice_index if by_slice else d.process_index for d in devices}
  if len(groups) != granules:
    raise ValueError(
        f"dcn shape {dcn_shape} needs {granules} "
        f"{'slices' if by_slice else 'processes'}, but the devices come from "
        f"{len(groups)}.")
  shape = resolve_mesh_shape(shape, len(devices) // granules)
  return Mesh(mesh_utils.create_hybrid_device_mesh(
      shape, dcn_shape, devices, process_is_granule=not by_slice,
      allow_split_physical_axes=True), MESH_AXES)


def axis_size(mesh: Mesh, axis) -> int:
  """The number of devices of `mesh` along `axis` (None, a name or a tuple of names)."""
  if axis is None:
    return 1
  axes = axis if isinstance(axis, tuple) else (axis,)
  return math.prod(mesh.shape[a] for a in axes)


def logical_to_shardings(logical_specs, shapes, mesh: Mesh, rules=DEFAULT_RULES):
  """NamedShardings for a pytree of logical PartitionSpecs, by `logical_spec` on `mesh`:
  a dimension whose mapped mesh axes do not divide it is an error that names the
  parameter, its shape and the axis (key / value heads: see `REPLICABLE`)."""

  def spec_of(path, logical, shape):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      spec = logical_spec(shape.shape, tuple(logical), rules,
                          f"Parameter {jax.tree_util.keystr(path)}")
    return NamedSharding(mesh, P() if spec is None else spec)

  return jax.tree_util.tree_map_with_path(
      spec_of, logical_specs, shapes, is_leaf=lambda x: isinstance(x, P))


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
  """Leading axis split over ('data', 'fsdp'), the rest replicated."""
  return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_divisor(mesh: Mesh) -> int:
  return axis_size(mesh, BATCH_AXES)


def context_batch_shards() -> int:
  """The data x fsdp size of the context mesh, 1 without one: how many blocks of rows a
  traced batch is split into."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return 1
  return math.prod(mesh.shape[a] for a in BATCH_AXES if a in mesh.axis_names)


class UnderMesh:
  """A jitted function traced and lowered under `mesh` as JAX's context mesh.

  The model's activation and KV-cache constraints need a context mesh while tracing
  (their rules come from the model config); compiled executables are unaffected.
  """

  def __init__(self, jitted, mesh: Mesh):
    self._jitted, self._mesh = jitted, mesh

  def __call__(self, *args, **kwargs):
    with jax.set_mesh(self._mesh):
      return self._jitted(*args, **kwargs)

  def lower(self, *args, **kwargs):
    with jax.set_mesh(self._mesh):
      return self._jitted.lower(*args, **kwargs)

  def eval_shape(self, *args, **kwargs):
    with jax.set_mesh(self._mesh):
      return jax.eval_shape(self._jitted, *args, **kwargs)

  def trace(self, *args, **kwargs):
    """The traced function (its jaxpr), under the mesh: e.g. to count its FLOPs."""
    with jax.set_mesh(self._mesh):
      return self._jitted.trace(*args, **kwargs)


def _one_device() -> bool:
  return jax.device_count() == 1


def logical_spec(shape: Sequence[int], logical_axes: Sequence[str | None], rules,
                 what: str = "array") -> P | None:
  """PartitionSpec of an array of `shape` (named `what` in errors) from logical axis
  names under `rules` and the context mesh; None when `rules` is None (then the context
  mesh, if any, must hold one device) or empty (no constraints, on purpose).

  Errors: rules without a context mesh in a process that sees several devices (the
  constraint would vanish; with one device there is nothing to shard), no rules on a mesh
  of several devices (likewise), and a dimension
  that its mesh axes do not divide, except for the `REPLICABLE` axes, which stay
  replicated there (logged once and counted in `REPLICATED`).
  """
  if rules == ():  # no constraints, deliberately (e.g. the shapes-only parameter init)
    return None
  mesh = jax.sharding.get_abstract_mesh()
  if rules is None:
    if not mesh.empty and mesh.size > 1:
      raise ValueError(
          f"{what} {tuple(logical_axes)} is traced on a mesh of {mesh.size} devices "
          f"({dict(mesh.shape)}) by a model config without axis rules, so it would get no "
          "sharding constraint: give the config axis_rules=sharding.DEFAULT_RULES.")
    return None
  if mesh.empty:
    if _one_device():  # nothing to shard, nothing lost
      return None
    raise ValueError(
        f"{what} {tuple(logical_axes)} is traced with axis rules but without a context "
        "mesh, so its sharding constraint would be dropped: trace it under "
        "jax.set_mesh(mesh) (sharding.UnderMesh wraps a jitted function), or use a model "
        "config with axis_rules=None.")
  spec = nn.logical_to_mesh_axes(tuple(logical_axes), rules)

  def usable(dim, name, axis):
    axes = () if axis is None else axis if isinstance(axis, tuple) else (axis,)
    axes = tuple(a for a in axes if a in mesh.axis_names)
    size = math.prod(mesh.shape[a] for a in axes)
    if dim % size == 0:
      return axis if axes else None
    if name not in REPLICABLE:
      raise ValueError(
          f"{what} of shape {tuple(shape)}: logical axis {name!r} (size {dim}) cannot be "
          f"split over mesh axes {axes} of size {size} (mesh {dict(mesh.shape)}).")
    kept = axes[:-1]
    while kept and dim % math.prod(mesh.shape[a] for a in kept):
      kept = kept[:-1]
    key = (name, dim, axes, size)
    if not REPLICATED[key]:
      logging.warning("%s: logical axis %r (size %d) does not divide mesh axes %s of size "
                      "%d; it is split over %s only and replicated over the rest.", what,
                      name, dim, axes, size, kept or "none of them")
    REPLICATED[key] += 1
    return (kept if len(kept) > 1 else kept[0]) if kept else None

  return P(*(usable(dim, name, axis)
             for dim, name, axis in zip(shape, tuple(logical_axes), tuple(spec))))


def constrain(x: jax.Array, logical_axes: Sequence[str | None], rules,
              what: str = "activation") -> jax.Array:
  """Sharding constraint of `x` by `logical_spec`; `x` itself when `rules` is None."""
  spec = logical_spec(x.shape, logical_axes, rules, what)
  return x if spec is None else jax.lax.with_sharding_constraint(x, spec)


def constrain_tree(tree, logical_specs, rules):
  """`constrain` of every leaf of `tree` by the matching logical PartitionSpec of
  `logical_specs` (e.g. `transformer.param_logical_axes`); `tree` when `rules` is None.

  Inside a jitted function this is where XLA reshards the leaves into the layout `rules`
  give them (one collective per leaf, where their layout changes).
  """
  return jax.tree_util.tree_map_with_path(
      lambda path, spec, x: constrain(x, tuple(spec), rules, jax.tree_util.keystr(path)),
      logical_specs, tree, is_leaf=lambda x: isinstance(x, P))


def process_rows(mesh: Mesh, num_rows: int) -> slice:
  """The rows [start, stop) of a `num_rows` batch that this process's devices hold.

  Rows are split over ('data', 'fsdp'); a process holds one contiguous block of them
  (meshes from `make_mesh` keep each process's devices together along those axes).
  """
  index_map = batch_sharding(mesh).addressable_devices_indices_map((num_rows,))
  spans = sorted({(i[0].start or 0, num_rows if i[0].stop is None else i[0].stop)
                  for i in index_map.values()})
  for (_, stop), (start, _) in zip(spans, spans[1:]):
    if start != stop:
      raise ValueError(
          f"Process {jax.process_index()} holds rows {spans} of the batch: not one "
          f"contiguous block; build the mesh with make_mesh (mesh {dict(mesh.shape)}).")
  return slice(spans[0][0], spans[-1][1])


def global_batch(mesh: Mesh, local_batch, num_rows: int):
  """Global arrays (rows split over ('data', 'fsdp')) from this process's rows.

  local_batch: a pytree of numpy arrays holding rows `process_rows(mesh, num_rows)`.
  """
  def put(x):
    x = np.asarray(x)
    return jax.make_array_from_process_local_data(
        batch_sharding(mesh, x.ndim), x, (num_rows,) + x.shape[1:])
  return jax.tree.map(put, local_batch)


def local_rows(x: jax.Array) -> np.ndarray:
  """This process's rows of a global array split along its first axis (one copy of
  each row, even where the 'tensor' axis holds it several times)."""
  shards = {}
  for shard in x.addressable_shards:
    shards.setdefault(shard.index[0].start or 0, shard.data)
  return np.concatenate([np.asarray(shards[k]) for k in sorted(shards)])
