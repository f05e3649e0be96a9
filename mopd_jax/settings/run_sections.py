"""The sections of what a run reads, samples, verifies, evaluates and runs on.

    top-level keys -> RunSettings         config.model   -> ModelSettings
    config.data    -> DataSettings        config.sampling-> SamplingSettings
    config.verifier-> VerifierSettings    config.eval    -> EvalSettings
    config.mesh    -> MeshSettings        config.distributed -> DistributedSettings

Each is a frozen dataclass of knobs (`mopd_jax.settings.knobs`), validated when built.
Imports no JAX.
"""

from __future__ import annotations

import dataclasses
import json
from typing import ClassVar

from mopd_jax import choices
from mopd_jax.choices import ConfigError
from mopd_jax.settings.knobs import (_DTYPES, _Section, _bool, _int, _num, _one_of, _optional,
                                     _str, knob)


@dataclasses.dataclass(frozen=True)
class RunSettings(_Section):
  """Top-level keys: seed, length of the run, checkpoint / eval / log cadence."""

  seed: int = knob(42, _int(0), "a non-negative integer")
  total_steps: int = knob(60, _int(0), "a non-negative integer")
  checkpoint_every: int = knob(20, _int(0), "a non-negative integer (0 = only on exit)")
  keep_checkpoints: int = knob(3, _int(1), "a positive integer")
  eval_every: int = knob(30, _int(0), "a non-negative integer (0 = before and after only)")
  log_every: int = knob(1, _int(1), "a positive integer")


@dataclasses.dataclass(frozen=True)
class ModelSettings(_Section):
  """The student: 'demo' (the built-in base model) or a Hugging Face checkpoint."""

  NAME: ClassVar[str] = "model"
  checkpoint: str | None = knob("demo", _optional(lambda v: isinstance(v, str) and v),
                                "'demo' or a checkpoint path", kind=str)
  preset: str = knob("", _str, "'' or a preset name of mopd_jax.models.presets",
                     "If set, the checkpoint must have this preset's shapes.")
  cache_dir: str | None = knob(None, _optional(_str), "None or a directory", kind=str)
  dtype: str = knob("float32", _one_of(_DTYPES), "'float32' or 'bfloat16'",
                    "Compute dtype.")
  param_dtype: str = knob("float32", _one_of(_DTYPES), "'float32' or 'bfloat16'")
  remat_policy: str = knob(
      "full", _one_of(choices.REMAT_POLICIES), f"one of {list(choices.REMAT_POLICIES)}",
      "jax.checkpoint policy of each layer in the backward pass ('none' = no remat).")
  unroll_layers: bool = knob(
      False, _bool, "True or False",
      "Unroll the scan over layers (same parameters; faster for tiny models on a CPU, "
      "compile time grows with depth).")
  attention: str = knob("auto", _one_of(choices.ATTENTION_KINDS),
                        f"one of {list(choices.ATTENTION_KINDS)}",
                        "Attention implementation (auto: splash on TPU, cudnn on GPU where "
                        "it applies, else blockwise; splash_interpret: the splash kernel in "
                        "the Pallas interpreter, for tests).")
  matmul_precision: str = knob(
      "default", _one_of(choices.MATMUL_PRECISIONS),
      f"one of {list(choices.MATMUL_PRECISIONS)}",
      "Precision of float32 matmuls ('highest' = no TF32 / bfloat16 passes on GPU / TPU).")

  def model_config(self, loaded, *, axis_rules, external_teacher: bool = False):
    """The `ModelConfig` a run computes with: `loaded`'s shapes with this section's
    numerics and the mesh's logical axis rules (`sharding.DEFAULT_RULES`). An external
    teacher keeps the parameter dtype it was loaded in (config.teacher.param_dtype) and no
    remat: it is never differentiated."""
    return dataclasses.replace(
        loaded, dtype=self.dtype, attention=self.attention, axis_rules=axis_rules,
        matmul_precision=self.matmul_precision, unroll_layers=self.unroll_layers,
        param_dtype=loaded.param_dtype if external_teacher else self.param_dtype,
        remat_policy="none" if external_teacher else self.remat_policy)

  def check(self):
    if self.checkpoint is None:
      raise ConfigError("config.model.checkpoint is required for this preset: pass "
                        "--config.model.checkpoint=PATH to a Hugging Face checkpoint "
                        "directory.")


def _json_object(v):
  if not isinstance(v, str):
    return False
  try:
    return isinstance(json.loads(v), dict)
  except ValueError:
    return False


DATA_TASKS = ("demo_code",) + tuple(choices.TASK_DOMAINS)
OVERLONG_MODES = ("filter", "truncate")


@dataclasses.dataclass(frozen=True)
class DataSettings(_Section):
  """Prompts: the demo task, or a real-data task read from the datasets' native files.

  A real-data task trains on `source` at `path` (with reader `options`) and evaluates on
  `eval_source` at `eval_path` (each defaulting to the training one) with `eval_options`;
  see mopd_jax.data.sources for the kinds and their options.
  """

  NAME: ClassVar[str] = "data"
  task: str = knob("demo_code", _one_of(DATA_TASKS), f"one of {DATA_TASKS}",
                   "'demo_code', or the domain of a real-data task (seqio task mopd_<task>).")
  source: str = knob("", _one_of(("",) + choices.SOURCE_KINDS),
                   f"'' or one of {choices.SOURCE_KINDS}",
                     "Source kind of the training problems ('' for demo_code).")
  path: str | None = knob(None, _optional(_str), "None or a file, directory or wheel path",
                          "The training problems' file, directory or wheel.", kind=str)
  options: str = knob("{}", _json_object, "a JSON object of reader options",
                      "e.g. '{\"split\": \"train\"}' (see the source's module).")
  eval_source: str = knob("", _one_of(("",) + choices.SOURCE_KINDS),
                          f"'' (the training source) or one of {choices.SOURCE_KINDS}")
  eval_path: str | None = knob(None, _optional(_str), "None (the training path) or a path",
                               kind=str)
  eval_options: str = knob("{}", _json_object, "a JSON object of reader options")
  cache_dir: str | None = knob(None, _optional(_str), "None or a directory",
                               "The tokenised prompts (default with the demo model: its "
                               "cache directory's data/; required with a checkpoint).",
                               kind=str)
  batch_size: int = knob(16, _int(1), "a positive integer",
                         "Prompts per step; rows = batch_size * sampling.num_samples.")
  max_prompt_len: int = knob(48, _int(2), "an integer >= 2")
  overlong: str = knob("filter", _one_of(OVERLONG_MODES), f"one of {OVERLONG_MODES}",
                       "Prompts longer than max_prompt_len are left out ('filter') or lose "
                       "the middle of their text ('truncate'); either way they are counted.")

  def check(self):
    given = [n for n in ("source", "path", "eval_source", "eval_path") if getattr(self, n)]
    if self.task == "demo_code":
      if given:
        raise ConfigError(f"Invalid {self.key(given[0])} = {getattr(self, given[0])!r} with "
                          "config.data.task = 'demo_code': the demo task has no source; "
                          f"set config.data.task to one of {DATA_TASKS[1:]}.")
      return
    for name in ("source", "path"):
      if not getattr(self, name):
        raise ConfigError(f"{self.key(name)} is required with config.data.task = "
                          f"{self.task!r}: pass --{self.key(name)}=...")


@dataclasses.dataclass(frozen=True)
class SamplingSettings(_Section):
  """Student rollouts during training (MOPD spec: temperature 1, top_p 1, top_k off)."""

  NAME: ClassVar[str] = "sampling"
  num_samples: int = knob(8, _int(1), "a positive integer", "G rollouts per prompt.")
  max_response_len: int = knob(4096, _int(1), "a positive integer")
  temperature: float = knob(1.0, _num(0.0, lo_open=True), "a number > 0")
  top_k: int = knob(0, _int(0), "a non-negative integer (0 = off)")
  top_p: float = knob(1.0, _num(0.0, 1.0, lo_open=True), "a number in (0, 1]")
  decode_layers: str = knob(
      "scan", _one_of(choices.DECODE_LAYERS), f"one of {choices.DECODE_LAYERS}",
      "How a decode step runs the layers: under a scan over the stacked weights, or one "
      "after another from weights split once per sampling call (one more copy of them "
      "while sampling; no per-step slice of each layer's weights). Faster depends on the "
      "backend: benchmarks.sampler_vs_hf --decode-layers=scan,unrolled compares them.")
  decode_layout: str = knob(
      "auto", _one_of(choices.DECODE_LAYOUTS), f"one of {choices.DECODE_LAYOUTS}",
      "Layout of the weights while sampling (training and evaluation). 'tensor': resharded "
      "once per sampling call into a copy split over the mesh's 'tensor' axis only (in the "
      "compute dtype), so a decode step reads local weights instead of gathering the "
      "fsdp-split ones at every generated token; the copy costs parameters x compute "
      "bytes / tensor size per device (the memory plan's 'decode weights'). 'wide': the "
      "same, split over 'tensor' and 'fsdp' together (tensor parallelism over both, rows "
      "split over 'data' only): a copy fsdp times smaller, wider activation reductions, "
      "and a KV cache split over fewer rows. 'auto': 'tensor', unless the memory plan of the "
      "compiled step says it does not fit the device, then 'wide' (one more compile; the "
      "plan names the layout chosen). 'train': decode in the training layout (weights "
      "gathered at every generated token).")


@dataclasses.dataclass(frozen=True)
class VerifierSettings(_Section):
  NAME: ClassVar[str] = "verifier"
  time_limit_s: float = knob(1.0, _num(0.0, lo_open=True), "a number > 0",
                             "Per test case, on top of one second of start-up.")
  max_workers: int | None = knob(None, _optional(_int(1)),
                                 "None (one per core) or a positive integer", kind=int)
  batch_deadline_s: float | None = knob(
      120.0, _optional(_num(0.0, lo_open=True)), "None or a number > 0",
      "After this many seconds per verification call, unfinished responses score 0 "
      "(counted as timeouts). None: no batch deadline beyond the per-response limits.",
      kind=float)
  success_threshold: float = knob(1.0, _num(0.0, 1.0), "a number in [0, 1]")
  dedupe: bool = knob(
      True, _bool, "True or False",
      "Identical responses to the same example in one verification call are verified once "
      "and share its result (reward, status, feedback); counted in the summary's "
      "duplicate_rows. Exact for a verifier whose result is a function of the response: "
      "set False for one with random results.")
  memory_bytes: int = knob(
      1 << 30, _int(16 << 20), "an integer number of bytes >= 16777216 (16 MiB)",
      "Memory of one code response: all the processes it starts together (a cgroup, where "
      "the host has one) and each process alone (its address space).")


@dataclasses.dataclass(frozen=True)
class EvalSettings(_Section):
  """Held-out evaluation (MOPD spec §5: n=8 samples, temperature 0.6, top_p 0.95)."""

  NAME: ClassVar[str] = "eval"
  num_prompts: int = knob(64, _int(1), "a positive integer")
  num_samples: int = knob(8, _int(1), "a positive integer")
  temperature: float = knob(0.6, _num(0.0), "a number >= 0 (0 = greedy)")
  top_p: float = knob(0.95, _num(0.0, 1.0, lo_open=True), "a number in (0, 1]")
  top_k: int = knob(0, _int(0), "a non-negative integer (0 = off)")


def _mesh_shape(v):
  return (isinstance(v, tuple) and len(v) == 3
          and all(_int()(s) and (s > 0 or s == -1) for s in v)
          and sum(s == -1 for s in v) <= 1)


@dataclasses.dataclass(frozen=True)
class MeshSettings(_Section):
  """('data', 'fsdp', 'tensor') mesh: `shape` within a slice (ICI), `dcn_shape` across
  slices or hosts (DCN); the global mesh is their elementwise product."""

  NAME: ClassVar[str] = "mesh"
  shape: tuple[int, ...] = knob(
      (-1, 1, 1), _mesh_shape,
      "three sizes for ('data', 'fsdp', 'tensor'), each positive or -1 (at most one -1: "
      "the remaining devices)")
  dcn_shape: tuple[int, ...] = knob(
      (1, 1, 1), lambda v: _mesh_shape(v) and -1 not in v,
      "three positive sizes for ('data', 'fsdp', 'tensor') across slices (TPU) or "
      "processes (GPU, CPU)",
      "(1, 1, 1): one slice. Otherwise the mesh is built with "
      "mesh_utils.create_hybrid_device_mesh and `shape` is the shape within one slice.")
  compile_for: str = knob(
      "", _str, "'' or a TPU topology as JAX names it, e.g. 'v5p:4x4x4'",
      "Compile-only run (mopd_jax.aot): compile the step for this topology (slices: the "
      "product of dcn_shape) from abstract shapes, print the memory plan against the "
      "chip's HBM, and exit 0 if it fits, 1 if not. Needs libtpu (the `tpu` extra).")


DISTRIBUTED_MODES = ("auto", "off", "explicit")


def _address(v):
  host, _, port = v.rpartition(":")
  return bool(host) and port.isdigit() and 0 < int(port) < 65536


@dataclasses.dataclass(frozen=True)
class DistributedSettings(_Section):
  """Multi-process start-up (`mopd_jax.distributed`).

  'auto' initialises jax.distributed when the environment describes a multi-process job
  (TPU pod, SLURM, or JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID as a
  Kubernetes Job or `launch/local.sh` sets them) and stays single-process otherwise;
  'explicit' uses the three keys below; 'off' never initialises.
  """

  NAME: ClassVar[str] = "distributed"
  mode: str = knob("auto", _one_of(DISTRIBUTED_MODES), f"one of {DISTRIBUTED_MODES}")
  coordinator_address: str | None = knob(
      None, _optional(lambda v: isinstance(v, str) and _address(v)),
      "None or 'host:port' (port 1-65535)", "Process 0 serves here ('explicit' only).",
      kind=str)
  num_processes: int | None = knob(None, _optional(_int(1)),
                                   "None or a positive integer", kind=int)
  process_id: int | None = knob(None, _optional(_int(0)),
                                "None or a non-negative integer", kind=int)
  initialization_timeout_s: int = knob(
      300, _int(1), "a positive integer",
      "Seconds to wait for the coordinator and for every process to join.")
  heartbeat_timeout_s: int = knob(
      100, _int(1), "a positive integer",
      "Seconds without a heartbeat after which the other processes stop.")

  def check(self):
    explicit = {"coordinator_address": self.coordinator_address,
                "num_processes": self.num_processes, "process_id": self.process_id}
    if self.mode == "explicit":
      missing = [self.key(k) for k, v in explicit.items() if v is None]
      if missing:
        raise ConfigError(f"config.distributed.mode = 'explicit' needs {missing}.")
      if self.process_id >= self.num_processes:
        raise ConfigError(
            f"Invalid config.distributed.process_id = {self.process_id}: must be below "
            f"config.distributed.num_processes = {self.num_processes}.")
    else:
      given = [self.key(k) for k, v in explicit.items() if v is not None]
      if given:
        raise ConfigError(f"{given} apply only with config.distributed.mode = 'explicit' "
                          f"(got mode {self.mode!r}).")
