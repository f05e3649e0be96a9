"""Compile-only run: the configured step compiled for a TPU topology, without a TPU.

`python -m mopd_jax.main --config=configs/code.py:qwen3_4b --config.mesh.compile_for=v5p:2x4x4`
builds the run's fused step from abstract shapes only (no weights, no data, no tokenizer,
no devices: the model's shapes come from `config.model.preset`), compiles it for the
devices of that TPU topology (`mopd_jax.topology`; slices = the product of
`config.mesh.dcn_shape`) on the mesh `config.mesh.shape`, prints the per-device memory
plan with the chip's HBM as the limit, and says whether it fits and, if not, which knobs
shrink it. The tokenizer's special ids and the peer-context template are stand-ins of the
template's length; they do not change the step's memory beyond a few tokens.
"""

from __future__ import annotations

import math
import types

import jax
import jax.numpy as jnp
import numpy as np

from mopd_jax import (memory_plan, peer_template, settings, sharding, topology, train_setup,
                      train_step)
from mopd_jax.models import presets, transformer

# Template pieces stand in at about one token per 4 characters of their text.
_CHARS_PER_TOKEN = 4


class _HostStandIn:
  """The host verifier's interface with fixed-shape zero outputs (never called: the step
  is only compiled)."""

  def __init__(self, feedback_len: int, summary_len: int):
    self.feedback_len, self.summary_len = feedback_len, summary_len

  def __call__(self, ids, tokens, lengths):
    del tokens, lengths
    n = len(ids)
    return (np.zeros(n, np.float32), np.zeros(n, np.int32),
            np.zeros((n, self.feedback_len), np.int32), np.zeros(n, np.int32))

  def summarize(self, tokens, lengths):
    del lengths
    n = len(tokens)
    return (np.zeros((n, self.summary_len), np.int32), np.zeros(n, np.int32),
            np.ones(n, np.int32))


def _settings(config) -> settings.Settings:
  values = config.to_dict() if hasattr(config, "to_dict") else dict(config)
  if not values["model"].get("preset"):
    raise settings.ConfigError(
        "config.mesh.compile_for needs config.model.preset (the model's shapes, e.g. "
        f"'qwen3-4b'; known: {list(presets.PRESETS)}): a compile-only run reads no "
        "checkpoint.")
  if values["teacher"].get("mode") == "external":
    raise settings.ConfigError(
        "config.mesh.compile_for does not support config.teacher.mode = 'external' (the "
        "external teacher's shapes come from its checkpoint).")
  # The checkpoint and the data are never read; their checks need a value.
  values["model"]["checkpoint"] = values["model"].get("checkpoint") or "(not read)"
  return settings.from_config(values)


def compile_for_topology(config) -> memory_plan.MemoryPlan:
  """The memory plan of the configured step compiled for `config.mesh.compile_for`."""
  return compile_step_for_topology(config)[1]


def compile_step_for_topology(config):
  """(the compiled step, its memory plan) for `config.mesh.compile_for`; the compiled
  step's `cost_analysis()` and `as_text()` are the TPU compiler's."""
  st = _settings(config)
  devices = topology.devices(st.mesh.compile_for, math.prod(st.mesh.dcn_shape))
  # The run's own mesh and row-split checks (the evaluation sampler is not compiled here).
  mesh = train_setup.make_mesh(st, devices, devices_of=st.mesh.compile_for,
                               evaluation=False)
  model_cfg = st.model.model_config(presets.get(st.model.preset),
                                    axis_rules=sharding.DEFAULT_RULES)
  optimizer, schedule = train_step.make_optimizer(st.optim)
  param_dtype = transformer.dtype_from_name(model_cfg.param_dtype)
  param_shapes = jax.eval_shape(lambda: jax.tree.map(
      lambda x: x.astype(param_dtype), transformer.init_params(model_cfg,
                                                               jax.random.PRNGKey(0))))
  state_shapes, shardings, _, _ = train_setup.state_layout(model_cfg, param_shapes,
                                                           optimizer, mesh)
  tokenizer = types.SimpleNamespace(stop_ids=(1,), pad_id=0)
  pieces = peer_template.TemplatePieces(**{
      name: jnp.full((max(1, len(text) // _CHARS_PER_TOKEN),), 3, jnp.int32)
      for name, text in peer_template.TEMPLATE_TEXTS.items()})
  setup = train_setup.Setup(
      settings=st, mesh=mesh, tokenizer=tokenizer, model_cfg=model_cfg,
      step_cfg=train_step.StepConfig.from_settings(st, model_cfg, tokenizer),
      optimizer=optimizer, schedule=schedule, base_params=None,
      external_teacher_params=None, state_shapes=state_shapes, shardings=shardings,
      train_batches=None, eval_batches=None,
      host_verifier=_HostStandIn(st.peers.feedback_len, st.peers.summary_len),
      pieces=pieces)
  return setup.compile_step()


def report(plan: memory_plan.MemoryPlan, topology_name: str) -> tuple[str, bool]:
  """(the plan's table with a verdict, whether the step fits on `topology_name`)."""
  if plan.device_limit is None:
    return (plan.table() + f"\nThe HBM of a {plan.device_kind} is not known here "
            f"(known: {list(topology.TPU_CHIPS)}): no verdict.", False)
  try:
    memory_plan.check_fits(plan)
  except ValueError as e:
    return f"{e}\nDoes NOT fit on {topology_name}.", False
  return plan.table() + f"\nFits on {topology_name}.", True


def compile_only(config) -> tuple[str, bool]:
  """`report` of the configured step compiled for `config.mesh.compile_for`.

  The TPU compiler itself refuses a program whose temporaries exceed the chip's HBM;
  that refusal is a verdict too (with the compiler's figures and the knobs), not a crash.
  """
  name = config.mesh.compile_for
  try:
    plan = compile_for_topology(config)
  except jax.errors.JaxRuntimeError as e:
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    return (f"The TPU compiler ran out of memory for one {name} device: "
            f"{str(e).splitlines()[0]}\nKnobs that shrink it: "
            f"{memory_plan.SHRINKING_KNOBS}\nDoes NOT fit on {name}.", False)
  return report(plan, name)
