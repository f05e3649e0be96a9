r"""What fits where: the paper's configured job compiled for TPU topologies from this host.

    python -m benchmarks.what_fits --results=fits.jsonl \
        --entry=qwen3-4b,v5p:2x2x2,0 --entry=qwen3-4b,v5p:2x2x2,128
    python -m benchmarks.what_fits --results=fits.jsonl --table

Each `--entry=PRESET,TOPOLOGY,MICRO_BATCH_ROWS[,MESH]` is the paper-scale code config
(`configs/code.py:qwen3_4b`: 32 prompts x 8 rollouts = 256 rows, prompt 2,048, response
4,096, peer cap 2,048, bf16 compute, float32 parameters, EMA self-teacher) with
`config.model.preset`, `config.optim.micro_batch_rows` and `config.mesh.compile_for` set,
compiled by the compile-only run (`mopd_jax.aot`) in its own subprocess under `--timeout`,
so that one slow or failed compile does not stop the rest. Each compile appends one JSON
line to `--results` as soon as it ends. The mesh is (data, fsdp, tensor) = (1, gcd(chips,
32), the rest) unless MESH (`1x8x4`) is given: every micro-batch must keep rows on every
data x fsdp device, and the 32 prompts of a step must split over them.

Per-chip bytes are the TPU compiler's memory analysis (arguments + temporaries, the
figure `mopd_jax.memory_plan` checks against the chip's HBM); where the compiler itself
refuses the program, the line keeps the temporaries it reported. `xla_flops` and
`xla_bytes_accessed` are the compiled program's cost analysis per device, which counts
each loop body once (layers, decode steps, micro-batches): far below the step's work, so
they are recorded but not used for the bound. The FLOPs of a step are counted instead
(`step_flops`, totals over all chips; matmuls only, 2 FLOPs per parameter per token, causal
attention at 4 x layers x heads x head_dim per query-key pair):

  sampling  prefill of each prompt once, decode of every rollout to the full response
            length, logits at every generated token;
  update    teacher forward + student forward and backward (3 x a forward; remat's
            recomputation not counted), logits at the response positions only, over the
            padded row lengths the step uses (`benchmarks.step_memory --flops-only`, run
            once per preset; its jaxpr count of the update, `update_flops`, is kept in the
            results file as a cross-check: it includes the recomputation and whole
            attention blocks, so it is no lower bound).

The step-time lower bound adds two phases that cannot overlap: sampling, at least
max(its FLOPs per chip / peak, response length x (decode weights + half the KV cache)
per chip / HBM bandwidth), since every decode step reads the sampler's weights and the
cache written so far; and the update, at least its FLOPs per chip / peak. It assumes every
rollout reaches the full response length and perfect balance over the chips.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import os
import re
import subprocess
import sys
import time

# Per-chip peaks from the Cloud TPU system architecture pages (cloud.google.com/tpu/docs/
# v5e, v5p, v6e), by `device.device_kind`: (bf16 FLOP/s, HBM bytes/s). The HBM capacity
# is `mopd_jax.topology.TPU_CHIPS`.
PEAKS = {
    "TPU v5 lite": (197e12, 819e9),  # v5e
    "TPU v5": (459e12, 2765e9),  # v5p
    "TPU v6 lite": (918e12, 1640e9),  # v6e
}
PROMPTS = 32  # the paper's batch: 32 prompts x 8 rollouts = 256 rows
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass(frozen=True)
class Entry:
  preset: str
  topology: str
  micro_batch_rows: int
  mesh: tuple[int, int, int] | None = None

  @classmethod
  def parse(cls, text: str) -> "Entry":
    parts = text.split(",")
    if len(parts) not in (3, 4):
      raise ValueError(f"--entry={text!r}: expected PRESET,TOPOLOGY,MICRO_BATCH_ROWS[,MESH].")
    mesh = tuple(int(x) for x in parts[3].split("x")) if len(parts) == 4 else None
    return cls(parts[0], parts[1], int(parts[2]), mesh)


def default_mesh(chips: int) -> tuple[int, int, int]:
  fsdp = math.gcd(chips, PROMPTS)
  return (1, fsdp, chips // fsdp)


def chips_of(topology_name: str) -> int:
  return math.prod(int(x) for x in topology_name.split(":")[1].split("x"))


def load_config(entry: Entry):
  spec = importlib.util.spec_from_file_location("code_config",
                                                os.path.join(_REPO, "configs", "code.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config("qwen3_4b")
  config.model.preset = entry.preset
  config.optim.micro_batch_rows = entry.micro_batch_rows
  config.mesh.compile_for = entry.topology
  config.mesh.shape = entry.mesh or default_mesh(chips_of(entry.topology))
  return config


_OUT_OF_MEMORY = re.compile(r"temporaries \(([\d.]+)([KMGT]?)\) exceeds available HBM "
                            r"\(([\d.]+)([KMGT]?)\)")
_UNIT = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def refused_bytes(message: str) -> tuple[int, int] | None:
  """(temporaries, usable HBM) in bytes from the TPU compiler's out-of-memory message
  (its G is 2**30 bytes), or None for another error."""
  m = _OUT_OF_MEMORY.search(message)
  if "RESOURCE_EXHAUSTED" not in message or not m:
    return None
  return (int(float(m.group(1)) * _UNIT[m.group(2)]),
          int(float(m.group(3)) * _UNIT[m.group(4)]))


def compile_entry(entry: Entry) -> dict:
  """Compiles one entry in this process; the JSON line's fields."""
  import jax  # pylint: disable=import-outside-toplevel

  from mopd_jax import aot  # pylint: disable=import-outside-toplevel
  config = load_config(entry)
  out = {"preset": entry.preset, "topology": entry.topology,
         "chips": chips_of(entry.topology), "mesh": list(config.mesh.shape),
         "micro_batch_rows": entry.micro_batch_rows}
  start = time.time()
  try:
    compiled, plan = aot.compile_step_for_topology(config)
  except jax.errors.JaxRuntimeError as e:
    refused = refused_bytes(str(e))
    if refused is None:
      raise
    return {**out, "fits": False, "compile_s": round(time.time() - start, 1),
            "compiler_refused": str(e).splitlines()[0][:300],
            "temp_bytes": refused[0], "compiler_hbm_bytes": refused[1]}
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return {**out, "fits": plan.fits(), "compile_s": round(time.time() - start, 1),
          "device": plan.device_kind, "device_limit_bytes": plan.device_limit,
          "total_bytes": plan.total, "argument_bytes": plan.argument, "temp_bytes": plan.temp,
          "params_bytes": plan.params, "opt_state_bytes": plan.opt_state,
          "teacher_bytes": plan.teacher, "kv_cache_bytes": plan.kv_cache,
          "decode_weights_bytes": plan.decode_weights,
          "xla_flops": cost.get("flops"), "xla_bytes_accessed": cost.get("bytes accessed")}


def _one(argv) -> None:
  from mopd_jax import topology  # pylint: disable=import-outside-toplevel
  topology.quiet_tpu_env()
  print("RESULT " + json.dumps(compile_entry(Entry.parse(argv[0]))), flush=True)


# ------------------------------------------------------------------ Counted FLOPs.
PROMPT_LEN, RESPONSE_LEN, GROUP, PEER_CAP = 2048, 4096, 8, 2048


def update_flops(preset: str, timeout: int) -> dict:
  """The update's matmul FLOPs (all chips together) from `benchmarks.step_memory`."""
  cmd = [sys.executable, "-m", "benchmarks.step_memory", "--flops-only", f"--preset={preset}",
         f"--rows={PROMPTS * GROUP}", f"--group={GROUP}", f"--prompt-len={PROMPT_LEN}",
         f"--response-len={RESPONSE_LEN}", f"--peer-cap={PEER_CAP}"]
  done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=_REPO,
                        env=_child_env(), check=True)
  line = json.loads(done.stdout.strip().splitlines()[-1])
  return {"kind": "update_flops", "preset": preset, "update_flops": line["update_flops"],
          "student_row": line["student_row"], "teacher_row": line["teacher_row"]}


def per_token_flops(m) -> tuple[int, int]:
  """(FLOPs of one token through the layers' matmuls, FLOPs of its logits) of a forward."""
  d, h, kv, hd = m.embed_dim, m.num_heads, m.num_kv_heads, m.head_dim
  return (2 * m.num_layers * (d * (h + 2 * kv) * hd + h * hd * d + 3 * d * m.mlp_dim),
          2 * d * m.vocab_size)


def step_flops(preset: str, student_row: int, teacher_row: int) -> dict:
  """Matmul FLOPs of one step, all chips together (see the module docstring).

  student_row / teacher_row: the padded lengths of the update's rows (prompt + response;
  the teacher's prompt carries the peer context), as `update_flops` reports them.
  """
  from mopd_jax.models import presets  # pylint: disable=import-outside-toplevel
  m = presets.get(preset)
  body, head = per_token_flops(m)
  # Causal attention, QK^T and PV: 4 x layers x heads x head_dim per (query, key) pair.
  pairs = lambda length: length * (length + 1) / 2  # noqa: E731
  attend = 4 * m.num_layers * m.num_heads * m.head_dim
  rows = PROMPTS * GROUP
  # Sampling: each prompt prefilled once; every rollout decoded to the full length, each
  # new token attending to the prompt and the tokens before it.
  prefill = PROMPTS * (PROMPT_LEN * body + head + attend * pairs(PROMPT_LEN))
  decode = rows * (RESPONSE_LEN * (body + head)
                   + attend * (RESPONSE_LEN * PROMPT_LEN + pairs(RESPONSE_LEN)))
  # Update: teacher forward; student forward + backward (3x a forward; remat's recompute
  # not counted); logits only at response positions.
  forward = lambda length: (length * body + RESPONSE_LEN * head  # noqa: E731
                            + attend * pairs(length))
  update = rows * (forward(teacher_row) + 3 * forward(student_row))
  return {"sampling": int(prefill + decode), "update": int(update)}


def step_bounds(line: dict, flops: dict) -> dict:
  """Lower bounds in seconds (see the module docstring) for one compiled line."""
  peak_flops, bandwidth = PEAKS[line["device"]]
  chips = line["chips"]
  read_per_token = line["decode_weights_bytes"] + line["kv_cache_bytes"] / 2
  sample = max(flops["sampling"] / chips / peak_flops,
               RESPONSE_LEN * read_per_token / bandwidth)
  train = flops["update"] / chips / peak_flops
  return {"sampling_s": sample, "update_s": train, "step_s": sample + train}


# ------------------------------------------------------------------ Running the entries.
def _child_env() -> dict:
  env = dict(os.environ, PYTHONPATH=_REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  env.setdefault("JAX_PLATFORMS", "cpu")
  env.setdefault("TPU_SKIP_MDS_QUERY", "1")
  # libtpu takes a host-wide lock when it loads; these processes never open a TPU, so they
  # may load it while another process (e.g. a CPU run of the project) holds the lock.
  env.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  return env


def run_entry(entry: Entry, timeout: int) -> dict:
  """One entry compiled in a subprocess; a timeout or a crash becomes a line too."""
  start = time.time()
  head = {"preset": entry.preset, "topology": entry.topology,
          "chips": chips_of(entry.topology),
          "mesh": list(entry.mesh or default_mesh(chips_of(entry.topology))),
          "micro_batch_rows": entry.micro_batch_rows}
  arg = ",".join([entry.preset, entry.topology, str(entry.micro_batch_rows)]
                 + (["x".join(map(str, entry.mesh))] if entry.mesh else []))
  try:
    done = subprocess.run([sys.executable, "-m", "benchmarks.what_fits", "--one", arg],
                          capture_output=True, text=True, timeout=timeout, cwd=_REPO,
                          env=_child_env(), check=False)
  except subprocess.TimeoutExpired:
    return {**head, "timeout_s": timeout}
  for line in done.stdout.splitlines():
    if line.startswith("RESULT "):
      return {**json.loads(line[len("RESULT "):]), "wall_s": round(time.time() - start, 1)}
  error = [l for l in done.stderr.splitlines() if l.strip()][-1:] or ["(no output)"]
  return {**head, "error": error[0][:400], "wall_s": round(time.time() - start, 1)}


def read_results(path: str) -> list[dict]:
  if not os.path.exists(path):
    return []
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def append(path: str, line: dict) -> None:
  with open(path, "a", encoding="utf-8") as f:
    f.write(json.dumps(line) + "\n")


# ------------------------------------------------------------------ The tables.
def _gib(b) -> str:
  return f"{b / 2**30:.1f}"


def _verdict(line: dict) -> str:
  if "timeout_s" in line:
    return f"timed out ({line['timeout_s']} s)"
  if "error" in line:
    return "error"
  if "compiler_refused" in line:
    return "no (compiler refused)"
  return "yes" if line["fits"] else "no"


_KIND = {"v5p": "TPU v5", "v6e": "TPU v6 lite", "v5e": "TPU v5 lite"}


def hbm_of(topology_name: str) -> int:
  from mopd_jax import topology  # pylint: disable=import-outside-toplevel
  return topology.TPU_CHIPS[_KIND[topology_name.split(":")[0]]][0]


def _rows(line: dict) -> int:
  return line["micro_batch_rows"] or PROMPTS * GROUP


def _flops_by_preset(lines: list[dict]) -> dict:
  return {l["preset"]: step_flops(l["preset"], l["student_row"], l["teacher_row"])
          for l in lines if l.get("kind") == "update_flops"}


def _bound(line: dict, flops: dict) -> str:
  if line["preset"] not in flops or "decode_weights_bytes" not in line:
    return "-"
  b = step_bounds(line, flops[line["preset"]])
  return f"{b['sampling_s']:.1f} + {b['update_s']:.1f} = {b['step_s']:.1f}"


def table(lines: list[dict]) -> str:
  """Markdown: one row per compile, in the order they ran."""
  flops = _flops_by_preset(lines)
  out = ["| preset | topology (chips) | mesh (data, fsdp, tensor) | micro_batch_rows | fits | "
         "per chip GiB: args + temp = total / HBM | PFLOP per step, all chips: sampling + "
         "update | lower bound s: sampling + update = step | compile s |",
         "|---|---|---|---|---|---|---|---|---|"]
  for l in lines:
    if l.get("kind"):
      continue
    hbm = _gib(hbm_of(l["topology"]))
    if "total_bytes" in l:
      memory = (f"{_gib(l['argument_bytes'])} + {_gib(l['temp_bytes'])} = "
                f"{_gib(l['total_bytes'])} / {hbm}")
    elif "temp_bytes" in l:
      memory = f"temp {_gib(l['temp_bytes'])} > {_gib(l['compiler_hbm_bytes'])} usable / {hbm}"
    else:
      memory = "-"
    f = flops.get(l["preset"])
    counted = f"{f['sampling'] / 1e15:.1f} + {f['update'] / 1e15:.1f}" if f else "-"
    seconds = l.get("compile_s", l.get("timeout_s", "-"))
    out.append(f"| {l['preset']} | {l['topology']} ({l['chips']}) | "
               f"{', '.join(map(str, l['mesh']))} | {_rows(l)} | {_verdict(l)} | {memory} | "
               f"{counted} | {_bound(l, flops)} | {seconds} |")
  return "\n".join(out)


def _order(item):
  """Smallest model first; then v5p, v6e, v5e; then fewer chips."""
  from mopd_jax.models import presets  # pylint: disable=import-outside-toplevel
  (preset, name, chips), _ = item
  return (presets.get(preset).num_params, list(_KIND).index(name.split(":")[0]), chips)


def summary(lines: list[dict]) -> str:
  """Markdown: per preset and topology, the largest micro_batch_rows that compiled and
  fit, the smallest refused, and the step's lower bound."""
  flops = _flops_by_preset(lines)
  by_pair = {}
  for l in lines:
    if not l.get("kind"):
      by_pair.setdefault((l["preset"], l["topology"], l["chips"]), []).append(l)
  out = ["| preset | topology (chips) | micro_batch_rows that fits | per chip GiB / HBM | "
         "larger one refused | step lower bound s |", "|---|---|---|---|---|---|"]
  for (preset, name, chips), group in sorted(by_pair.items(), key=_order):
    fit = [l for l in group if l.get("fits")]
    refused = [_rows(l) for l in group if l.get("fits") is False]
    best = max(fit, key=_rows) if fit else None
    bigger = [r for r in refused if best is None or r > _rows(best)]
    one_row_each = group[0]["mesh"][0] * group[0]["mesh"][1]  # rows of a 1-row micro-batch
    verdict = (_rows(best) if best else
               f"none: {one_row_each} (1 row per device) does not fit"
               if one_row_each in refused else "none of those tried")
    if best is None and one_row_each in refused:
      bigger = []
    out.append(
        f"| {preset} | {name} ({chips}) | {verdict} | "
        + (f"{_gib(best['total_bytes'])} / {_gib(hbm_of(name))}" if best else "-") + " | "
        + (str(min(bigger)) if bigger else "-" if best is None else
           "- (all rows at once)" if _rows(best) == PROMPTS * GROUP else "not tried")
        + f" | {_bound(best, flops) if best else '-'} |")
  return "\n".join(out)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--results", required=True, help="JSON lines file, appended to")
  p.add_argument("--entry", action="append", default=[],
                 help="PRESET,TOPOLOGY,MICRO_BATCH_ROWS[,MESH e.g. 1x8x4]")
  p.add_argument("--timeout", type=int, default=3600, help="seconds per compile")
  p.add_argument("--table", action="store_true", help="only print the table of --results")
  args = p.parse_args(argv)
  if not args.table:
    for entry in map(Entry.parse, args.entry):
      have = {l["preset"] for l in read_results(args.results) if l.get("kind")}
      if entry.preset not in have:
        append(args.results, update_flops(entry.preset, args.timeout))
      line = run_entry(entry, args.timeout)
      append(args.results, line)
      print(json.dumps(line), flush=True)
  lines = read_results(args.results)
  print(summary(lines) + "\n\n" + table(lines))


if __name__ == "__main__":
  if sys.argv[1:2] == ["--one"]:
    _one(sys.argv[2:])
  else:
    main()
