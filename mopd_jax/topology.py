"""TPU devices of a named topology, for compiling ahead of time on a host without a TPU.

With `libtpu` installed (the `tpu` extra), `jax.experimental.topologies` describes the
devices of any TPU topology (`v5e:2x2`, `v5p:4x4x4`, ..., over one or several slices)
without the hardware. A mesh built from them makes `jax.jit(...).lower(abstract inputs)
.compile()` produce the TPU program: its memory analysis, cost analysis and optimized HLO.
Nothing can run on these devices; they exist to compile for.

Compiling for a topology on a CPU host needs `JAX_PLATFORMS=cpu` (so the process does not try
to open a TPU, which prints errors and costs seconds) and `TPU_SKIP_MDS_QUERY=1` (so libtpu
does not ask a cloud metadata server about the host); `quiet_tpu_env` sets both where unset.

`collectives` summarises the collectives of an optimized HLO text by kind and by where they
sit: inside the sampler's decode loop, inside the training forward/backward, or elsewhere.
"""

from __future__ import annotations

import collections
import glob
import importlib.util
import os
import re

import numpy as np

# High-bandwidth memory and TensorCores per chip, from the Cloud TPU system architecture
# pages (cloud.google.com/tpu/docs/v4, v5e, v5p, v6e), keyed by `device.device_kind`.
GIB = 2**30
TPU_CHIPS = {
    "TPU v4": (32 * GIB, 2),
    "TPU v5 lite": (16 * GIB, 1),  # v5e
    "TPU v5": (95 * GIB, 2),  # v5p
    "TPU v6 lite": (32 * GIB, 1),  # v6e (Trillium)
}


def quiet_tpu_env() -> None:
  """Environment for compiling for TPU topologies on a CPU host; call before JAX starts."""
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")


def _host_has(*patterns: str) -> bool:
  return any(glob.glob(p) for p in patterns)


def skip_absent_tpu() -> None:
  """On a host with libtpu installed but neither a TPU nor a GPU, run JAX on the CPU.

  Without it, JAX tries the TPU first, prints initialisation errors and spends seconds
  before falling back to the CPU. Changes nothing where JAX_PLATFORMS is set, where
  libtpu is absent, or where the host has TPU device nodes (/dev/accel*: v4, v5p;
  /dev/vfio/<n>: v5e, v6e) or an NVIDIA GPU. Call before JAX starts.
  """
  if "JAX_PLATFORMS" in os.environ or importlib.util.find_spec("libtpu") is None:
    return
  if _host_has("/dev/accel*", "/dev/vfio/[0-9]*", "/dev/nvidia[0-9]*"):
    return
  quiet_tpu_env()


def devices(name: str, num_slices: int = 1) -> list:
  """The devices of topology `name` (as JAX spells it, e.g. 'v5e:2x2') over `num_slices`.

  Raises ValueError naming the topology when libtpu is missing or does not know it.
  """
  if num_slices < 1:
    raise ValueError(f"The number of slices must be at least 1, got {num_slices}.")
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
  try:
    desc = topologies.get_topology_desc(platform="tpu", topology_name=name,
                                        num_slices=num_slices)
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(
        f"Cannot describe TPU topology {name!r} x {num_slices} slice(s): {e}. Compiling for "
        "a topology needs libtpu (pip install 'mopd_jax[tpu]') and a name as JAX spells it, "
        "e.g. 'v5e:2x2', 'v5p:2x2x2', 'v6e:2x4'.") from e
  return list(desc.devices)


def hbm_bytes(device) -> int | None:
  """HBM of one TPU device (its share of the chip: a device may be one of the chip's
  TensorCores or all of them), or None for a kind not in `TPU_CHIPS`."""
  if device.device_kind not in TPU_CHIPS:
    return None
  per_chip, cores = TPU_CHIPS[device.device_kind]
  return per_chip * min(device.num_cores, cores) // cores


# ------------------------------------------------------------------ HLO collectives.
COLLECTIVE_KINDS = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all",
                    "collective-permute")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2,
                "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8}
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_INSTRUCTION = re.compile(
    r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.+?)\s+([a-z][\w\-]*)\((?:[^%)]*%([\w.\-]+))?")
_ARRAY = re.compile(r"\b(" + "|".join(_DTYPE_BYTES) + r")\[([\d,]*)\]")
_WHILE = re.compile(r"\bwhile\(.*\bbody=%?([\w.\-]+)")
_CALLEES = re.compile(r"\b(?:calls|to_apply|body|condition|true_computation|"
                      r"false_computation)=%?([\w.\-]+)|branch_computations=\{([^}]*)\}")
_OP_NAME = re.compile(r'op_name="([^"]*)"')


def _result_bytes(shape_text: str) -> int:
  """Bytes of an instruction's result type (a tuple counts every element)."""
  total = 0
  for dtype, dims in _ARRAY.findall(shape_text):
    size = int(np.prod([int(d) for d in dims.split(",") if d])) if dims else 1
    total += size * _DTYPE_BYTES[dtype]
  return total


def _largest_array_bytes(shape_text: str) -> int:
  return max((_result_bytes(f"{dtype}[{dims}]") for dtype, dims in _ARRAY.findall(shape_text)),
             default=0)


def _parse(hlo_text: str):
  """{computation: [instruction lines]} of an HLO module's text."""
  computations, current = {}, None
  for line in hlo_text.splitlines():
    m = _COMPUTATION.match(line)
    if m and "=" not in line.split("{")[0].split("(")[0]:
      current = computations.setdefault(m.group(1), [])
    elif line.strip() == "}":
      current = None
    elif current is not None:
      current.append(line)
  return computations


def _decode_bodies(computations: dict, decode_marker: str) -> list[str]:
  """Names of the bodies of the `while` loops whose op_name contains `decode_marker`."""
  bodies = []
  for lines in computations.values():
    for line in lines:
      m = _WHILE.search(line)
      name = _OP_NAME.search(line)
      if m and name and decode_marker in name.group(1):
        bodies.append(m.group(1))
  return bodies


def _reachable(computations, roots) -> set:
  seen, todo = set(), list(roots)
  while todo:
    name = todo.pop()
    if name in seen or name not in computations:
      continue
    seen.add(name)
    for line in computations[name]:
      for single, branches in _CALLEES.findall(line):
        todo.extend([single] if single else
                     [b.strip().lstrip("%") for b in branches.split(",")])
  return seen


def collectives(hlo_text: str, decode_marker: str = "decode") -> dict:
  """Count and result bytes of each collective kind in an optimized HLO module's text.

  Returns {"decode_loop" | "training" | "rest": {kind: {"count", "bytes"}}}:
  - decode_loop: inside the body of a `while` loop whose op_name (the JAX name stack)
    contains `decode_marker` (the sampler's decode loop runs under a named scope so named)
    and whatever that body calls;
  - training: elsewhere, with an op_name from differentiation (`jvp(` or `transpose(`);
  - rest: everything else (prefill, teacher forward, optimizer update, ...).
  An async collective counts once (at its `-start`). Bytes are those of the result. A
  collective without metadata takes the op_name of its first operand (up the chain).
  """
  computations = _parse(hlo_text)
  in_decode = _reachable(computations, set(_decode_bodies(computations, decode_marker)))
  # Instruction -> (its op_name or None, its first operand). Passes after partitioning
  # (e.g. the multi-slice decomposition) create collectives without metadata: such a
  # collective is named after the first operand up its chain that has an op_name.
  origin = {}
  for lines in computations.values():
    for line in lines:
      m = _INSTRUCTION.match(line)
      if m:
        name = _OP_NAME.search(line)
        origin[m.group(1)] = (name.group(1) if name else None, m.group(4))

  def op_name_of(instruction):
    for _ in range(len(origin)):
      op_name, operand = origin.get(instruction, (None, None))
      if op_name is not None or operand is None:
        return op_name or ""
      instruction = operand
    return ""

  out = {part: collections.defaultdict(lambda: {"count": 0, "bytes": 0})
         for part in ("decode_loop", "training", "rest")}
  for comp, lines in computations.items():
    for line in lines:
      m = _INSTRUCTION.match(line)
      if not m:
        continue
      op = m.group(3)
      kind = op[:-len("-start")] if op.endswith("-start") else op
      if kind not in COLLECTIVE_KINDS:
        continue
      op_name = op_name_of(m.group(1))
      if comp in in_decode:
        part = "decode_loop"
      elif "jvp(" in op_name or "transpose(" in op_name:
        part = "training"
      else:
        part = "rest"
      entry = out[part][kind]
      entry["count"] += 1
      # An async start's result is a tuple holding its operand too: count the output.
      entry["bytes"] += (_largest_array_bytes(m.group(2)) if op.endswith("-start")
                         else _result_bytes(m.group(2)))
  return {part: dict(kinds) for part, kinds in out.items()}


_CONDITION = re.compile(r"\bcondition=%?([\w.\-]+)")
_LT_CONSTANT = re.compile(r"compare\(%[\w.\-]+, %([\w.\-]+)\), direction=LT")
_CONSTANT = re.compile(r"^\s*%?([\w.\-]+)\s*=\s*s32\[\][^ ]*\s+constant\((\d+)\)")


def _trip_count(computations, condition: str) -> int:
  """Iterations of a `while` whose condition is `counter < constant` (a scan, fori_loop
  with static bounds); 1 where the bound is not a constant (e.g. the decode attention's
  loop over the written cache blocks)."""
  lines = computations.get(condition, [])
  constants = dict(m.groups() for m in map(_CONSTANT.match, lines) if m)
  for line in lines:
    m = _LT_CONSTANT.search(line)
    if m and m.group(1) in constants:
      return int(constants[m.group(1)])
  return 1


def decode_step_collectives(hlo_text: str, decode_marker: str = "decode") -> dict:
  """{kind: {"count", "bytes", "largest"}} that one iteration of the sampler's decode loop
  runs ("largest": the bytes of the largest single collective of that kind).

  As `collectives`' "decode_loop" part, but a collective inside a loop nested in the decode
  loop's body (the scan over the layers) counts once per iteration of that loop (its
  trip count from the loop condition's constant bound, see `_trip_count`). One iteration
  generates one token for every row.
  """
  computations = _parse(hlo_text)
  roots = _decode_bodies(computations, decode_marker)
  out = collections.defaultdict(lambda: {"count": 0, "bytes": 0, "largest": 0})

  def visit(comp, times, depth):
    if comp not in computations or depth > 64:
      return
    for line in computations[comp]:
      m = _INSTRUCTION.match(line)
      if m:
        op = m.group(3)
        kind = op[:-len("-start")] if op.endswith("-start") else op
        if kind in COLLECTIVE_KINDS:
          size = (_largest_array_bytes(m.group(2)) if op.endswith("-start")
                  else _result_bytes(m.group(2)))
          out[kind]["count"] += times
          out[kind]["bytes"] += times * size
          out[kind]["largest"] = max(out[kind]["largest"], size)
      loop = _WHILE.search(line)
      condition = _CONDITION.search(line)
      for single, branches in _CALLEES.findall(line):
        for callee in ([single] if single else
                       [b.strip().lstrip("%") for b in branches.split(",")]):
          if loop and callee == loop.group(1):
            visit(callee, times * _trip_count(computations, condition.group(1)), depth + 1)
          elif not (condition and callee == condition.group(1)):
            visit(callee, times, depth + 1)

  # Only the outermost decode loops: a body nested in another decode body is visited
  # from there.
  nested = set().union(*[_reachable(computations, [r]) - {r} for r in roots]) if roots else set()
  for root in roots:
    if root not in nested:
      visit(root, 1, 0)
  return dict(out)


def scoped_collectives(hlo_text: str, scope: str) -> dict:
  """{kind: {"count", "bytes"}} of the collectives whose op_name (JAX name stack) holds
  `scope`, e.g. the sampler's reshard into its decode layout ("decode_layout")."""
  out = collections.defaultdict(lambda: {"count": 0, "bytes": 0})
  for lines in _parse(hlo_text).values():
    for line in lines:
      m = _INSTRUCTION.match(line)
      name = _OP_NAME.search(line)
      if not m or not name or scope not in name.group(1):
        continue
      op = m.group(3)
      kind = op[:-len("-start")] if op.endswith("-start") else op
      if kind in COLLECTIVE_KINDS:
        out[kind]["count"] += 1
        out[kind]["bytes"] += (_largest_array_bytes(m.group(2)) if op.endswith("-start")
                               else _result_bytes(m.group(2)))
  return dict(out)
