"""Every step compiled for real TPU topologies from this CPU host (libtpu, ahead of time).

A tiny model's fused step, split step (sample / update) and evaluation sampler are lowered
and compiled for the devices of `v5e:2x2` and of 2 slices of it, under both partitioners
(Shardy, JAX's default, and GSPMD), with `attention="auto"`, which must resolve to the
`splash` kernels there. Nothing runs: the TPU compiler's memory analysis, cost analysis and
optimized HLO are what is checked. Skipped where libtpu is not installed (the `tpu` extra).
"""

import argparse
import contextlib
import dataclasses
import os

import pytest

os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # no cloud metadata query from libtpu
pytest.importorskip("libtpu", reason="compiling for a TPU topology needs libtpu "
                    "(pip install 'mopd_jax[tpu]')")

# pylint: disable=wrong-import-position
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks import step_memory  # noqa: E402
from mopd_jax import aot, memory_plan, sampling, sharding, topology, train_step  # noqa: E402
from mopd_jax.models import attention as attention_lib  # noqa: E402
from mopd_jax.models import presets, transformer  # noqa: E402
from tests.conftest import load_config  # noqa: E402

TINY = transformer.ModelConfig(vocab_size=256, num_layers=1, embed_dim=128, num_heads=4,
                               num_kv_heads=2, head_dim=128, mlp_dim=256, attention="auto")
TOPOLOGIES = {"v5e:2x2": 1, "v5e:2x2 x 2 slices": 2}


def _args(num_slices):
  """The benchmark's own flags (its defaults for the rest); the model is TINY."""
  return step_memory.parse_args([
      "--preset=tiny", "--rows=8", "--group=2", "--prompt-len=8", "--response-len=8",
      "--peer-cap=8", "--mesh=1,2,2", "--dtype=bfloat16", "--param-dtype=float32",
      "--chunk-size=8", "--top-k=4", "--topology=v5e:2x2", f"--num-slices={num_slices}",
      "--decode-layout=tensor", "--feedback-len=16"])


@pytest.fixture(scope="module", params=list(TOPOLOGIES))
def parts(request):
  return step_memory.build_step(TINY, _args(TOPOLOGIES[request.param]))


@pytest.fixture(autouse=True)
def _xla_default_optimization(monkeypatch):
  """The TPU programs these tests inspect are compiled at XLA's default backend
  optimization level (3), as a user's are: conftest lowers it through XLA_FLAGS to
  compile the CPU tests faster, and at level 0 the TPU compiler keeps, e.g., the decode
  layout's reshard inside the decode loop."""
  compile_ = jax.stages.Lowered.compile

  def compile_at_default(self, compiler_options=None, **kwargs):
    options = {"xla_backend_optimization_level": 3, **(compiler_options or {})}
    return compile_(self, options, **kwargs)

  monkeypatch.setattr(jax.stages.Lowered, "compile", compile_at_default)


@contextlib.contextmanager
def _partitioner(shardy: bool):
  previous = jax.config.jax_use_shardy_partitioner
  jax.config.update("jax_use_shardy_partitioner", shardy)
  try:
    yield
  finally:
    jax.config.update("jax_use_shardy_partitioner", previous)


def _check(compiled):
  """Memory and cost analyses are there and the program is a TPU one that runs the
  splash kernels (Mosaic custom calls), which `attention="auto"` chose."""
  stats = compiled.memory_analysis()
  assert stats.temp_size_in_bytes > 0 and stats.argument_size_in_bytes > 0
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  assert cost["flops"] > 0 and cost["bytes accessed"] > 0
  text = compiled.as_text()
  assert 'custom_call_target="tpu_custom_call"' in text and "splash_mha" in text
  return text


def test_topology_devices_are_tpus_with_their_hbm(parts):
  devices = parts.mesh.devices.flatten()
  assert {d.platform for d in devices} == {"tpu"}
  assert {d.device_kind for d in devices} == {"TPU v5 lite"}
  assert memory_plan.device_memory_limit(devices[0]) == 16 * 2**30
  assert len({getattr(d, "slice_index", 0) for d in devices}) == parts.mesh.size // 4
  with jax.set_mesh(parts.mesh):
    q = jax.ShapeDtypeStruct((1, 1, 4, 128), jnp.bfloat16)
    assert attention_lib.target_platform() == "tpu"
    assert attention_lib.resolve_kind("auto", q, q) == "splash"
  assert attention_lib.target_platform() == "cpu"  # the process itself has no TPU


@pytest.mark.parametrize("shardy", [True, False], ids=["shardy", "gspmd"])
def test_fused_step_compiles(parts, shardy):
  step = train_step.make_train_step(parts.cfg, parts.mesh, parts.host, parts.optimizer,
                                    parts.pieces, parts.shardings)
  with _partitioner(shardy):
    compiled = step.lower(parts.abstract_state, parts.batch).compile()
  text = _check(compiled)
  # The verifier's host callback is in the program (one send per operand, on the devices
  # of tensor index 0), and the training forward/backward over the sharded weights
  # communicates.
  assert "host_transfer_rendezvous" in text and " send(" in text
  assert sum(c["count"] for c in topology.collectives(text)["training"].values()) > 0


def test_split_step_and_evaluation_sampler_compile(parts):
  """Each program under one partitioner per topology (Shardy on one slice, GSPMD on two),
  so that both partitioners and both topologies are covered in half the compile time."""
  cfg, mesh = parts.cfg, parts.mesh
  shardy = parts.mesh.size == 4
  step = train_step.make_split_step(cfg, mesh, parts.host, parts.optimizer, parts.pieces,
                                    parts.shardings)
  with _partitioner(shardy):
    sample = step.sample.lower(parts.abstract_state, parts.batch)
  n, lr = sample.out_info.tokens.shape
  rows = lambda shape, dtype: jax.ShapeDtypeStruct(  # noqa: E731
      shape, dtype, sharding=sharding.batch_sharding(mesh, len(shape)))
  rollouts = train_step.Rollouts(
      tokens=rows((n, lr), jnp.int32), logprobs=rows((n, lr), jnp.float32),
      lengths=rows((n,), jnp.int32), finished=rows((n,), jnp.bool_),
      rewards=rows((n,), jnp.float32), status=rows((n,), jnp.int32),
      feedback=rows((n, cfg.peers.feedback_len), jnp.int32),
      feedback_lengths=rows((n,), jnp.int32))
  # The evaluation sampler: its own sampling settings, outputs split by rows (as in
  # evaluation.Evaluator).
  evaluation = sampling.Sampler(model=cfg.model, max_new_tokens=lr, stop_ids=cfg.stop_ids,
                                pad_id=cfg.pad_id, temperature=0.6, top_p=0.95,
                                num_samples=4)
  args = (parts.abstract_state.params, parts.batch["prompt_tokens"],
          parts.batch["prompt_mask"], parts.abstract_state.rng)
  shapes = jax.eval_shape(evaluation.__call__, *args)
  jitted = sharding.UnderMesh(jax.jit(evaluation.__call__, out_shardings=jax.tree.map(
      lambda x: sharding.batch_sharding(mesh, x.ndim), shapes)), mesh)
  with _partitioner(shardy):
    _check(sample.compile())
    _check(step.update.lower(parts.abstract_state, parts.batch, rollouts).compile())
    _check(jitted.lower(*args).compile())


@pytest.fixture(scope="module")
def fsdp_parts():
  """The tiny model at 2 layers with FSDP over the 4 chips of v5e:2x2 (mesh 1, 4, 1)."""
  return step_memory.build_step(dataclasses.replace(TINY, num_layers=2),
                                argparse.Namespace(**{**vars(_args(1)), "mesh": "1,4,1"}))


def test_fused_step_decodes_without_gathering_weights(fsdp_parts):
  """Under Shardy (JAX's default partitioner) the sampler reshards the weights into its
  decode layout once per step, and its decode loop holds no collective at all."""
  parts = fsdp_parts
  assert parts.cfg.sampler.decode_layout == "tensor"
  step = train_step.make_train_step(parts.cfg, parts.mesh, parts.host, parts.optimizer,
                                    parts.pieces, parts.shardings)
  with _partitioner(True):
    text = step.lower(parts.abstract_state, parts.batch).compile().as_text()
  assert "all-gather" not in topology.collectives(text)["decode_loop"]
  assert topology.decode_step_collectives(text) == {}
  # The weights are gathered once per step instead, in the compute dtype: (almost) every
  # parameter is split over fsdp in training, and arrives as 2 bytes (not 4: float32).
  weight_bytes = 2 * parts.cfg.model.num_params
  reshard = topology.scoped_collectives(text, "decode_layout")
  assert 0.9 * weight_bytes <= reshard["all-gather"]["bytes"] <= weight_bytes
  # The control: the sampler in the training layout gathers weights at every token.
  text = _sampler_hlo(parts, "train")
  assert topology.decode_step_collectives(text)["all-gather"]["bytes"] > weight_bytes / 2


def _sampler_hlo(parts, layout: str) -> str:
  """Optimized TPU HLO of the sampler alone in `layout`, under Shardy."""
  sampler = dataclasses.replace(parts.cfg.sampler, decode_layout=layout)
  jitted = sharding.UnderMesh(jax.jit(sampler.__call__), parts.mesh)
  with _partitioner(True):
    return jitted.lower(parts.abstract_state.params, parts.batch["prompt_tokens"],
                        parts.batch["prompt_mask"],
                        parts.abstract_state.rng).compile().as_text()


def test_wide_decode_layout_decodes_without_gathering_weights(fsdp_parts):
  """The fallback layout (weights split over tensor x fsdp, here the 4 chips): the
  sampler's decode loop communicates activations only, and the reshard into it moves
  at most the compute-dtype weights once per call."""
  parts = fsdp_parts
  text = _sampler_hlo(parts, "wide")
  model = parts.cfg.model
  weight_bytes = 2 * model.num_params
  # No collective of a decode step is as large as the smallest weight matrix of a layer
  # (the key projection, [D, K, Dh] in bfloat16): the rows' activations (tensor-parallel
  # reductions, the gathered heads and logits) are what moves.
  smallest = 2 * model.embed_dim * model.num_kv_heads * model.head_dim
  per_token = topology.decode_step_collectives(text)
  assert per_token and max(c["largest"] for c in per_token.values()) < smallest / 4, per_token
  reshard = topology.scoped_collectives(text, "decode_layout")
  assert 0 < sum(c["bytes"] for c in reshard.values()) <= weight_bytes, reshard


def test_compile_only_run_checks_the_plan_against_the_chips_hbm(monkeypatch):
  """`--config.mesh.compile_for`: the configured run compiled from the preset's shapes
  (the tiny model stands in for a preset here), no checkpoint or data read."""
  monkeypatch.setattr(presets, "get", lambda name: TINY)
  config = load_config(**{
      "model.preset": "tiny", "model.checkpoint": "/nonexistent", "mesh.shape": (1, 2, 2),
      "mesh.compile_for": "v5e:2x2", "data.batch_size": 4, "data.max_prompt_len": 8,
      "sampling.num_samples": 2, "sampling.max_response_len": 8, "peers.peer_cap": 8,
      "loss.chunk_size": 8})
  plan = aot.compile_for_topology(config)
  assert plan.device_kind == "TPU v5 lite" and plan.device_limit == 16 * 2**30
  assert 0 < plan.temp and plan.params < plan.argument
  text, fits = aot.report(plan, "v5e:2x2")
  assert fits and text.endswith("Fits on v5e:2x2.") and "Memory plan per device" in text
  text, fits = aot.report(dataclasses.replace(plan, device_limit=plan.total - 1), "v5e:2x2")
  assert not fits and "config.optim.micro_batch_rows" in text
  assert text.endswith("Does NOT fit on v5e:2x2.")


def test_a_host_without_tpu_or_gpu_starts_jax_on_the_cpu(monkeypatch):
  """With libtpu installed, `python -m mopd_jax.main` on a CPU host must not try a TPU
  (errors printed, seconds lost); a TPU VM (or a GPU host) keeps JAX's own choice."""
  monkeypatch.delenv("JAX_PLATFORMS", raising=False)
  monkeypatch.setattr(topology.glob, "glob", lambda pattern: [])
  topology.skip_absent_tpu()
  assert os.environ["JAX_PLATFORMS"] == "cpu"
  for node in ("/dev/accel0", "/dev/vfio/0", "/dev/nvidia0"):
    monkeypatch.delenv("JAX_PLATFORMS", raising=False)
    monkeypatch.setattr(topology.glob, "glob",
                        lambda pattern, node=node: [node] if pattern[:8] == node[:8] else [])
    topology.skip_absent_tpu()
    assert "JAX_PLATFORMS" not in os.environ, node


def test_compile_only_run_names_the_knob_before_compiling(monkeypatch):
  from mopd_jax import settings  # pylint: disable=import-outside-toplevel
  with pytest.raises(settings.ConfigError, match=r"needs config.model.preset"):
    aot.compile_for_topology(load_config(**{"mesh.compile_for": "v5e:2x2"}))
  monkeypatch.setattr(presets, "get", lambda name: TINY)
  config = load_config(**{"model.preset": "tiny", "mesh.compile_for": "v5e:2x2",
                          "mesh.shape": (1, -1, 1), "data.batch_size": 2})
  with pytest.raises(settings.ConfigError, match=r"config.data.batch_size=2 must be "
                     r"divisible by the data x fsdp mesh size 4"):
    aot.compile_for_topology(config)
  config = load_config(**{"model.preset": "tiny", "mesh.compile_for": "v5e:9x9"})
  with pytest.raises(ValueError, match=r"Cannot describe TPU topology 'v5e:9x9'"):
    aot.compile_for_topology(config)


def test_compile_only_run_turns_the_compilers_out_of_memory_into_a_verdict(monkeypatch):
  def out_of_memory(config):
    del config
    raise jax.errors.JaxRuntimeError(
        "RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
        "temporaries (35.04G) exceeds available HBM (15.75G).\nmore")

  monkeypatch.setattr(aot, "compile_for_topology", out_of_memory)
  config = load_config(**{"model.preset": "tiny", "mesh.compile_for": "v5e:4x4"})
  text, fits = aot.compile_only(config)
  assert not fits and "(35.04G) exceeds available HBM (15.75G)." in text
  assert "config.optim.micro_batch_rows" in text and text.endswith("Does NOT fit on v5e:4x4.")

  def other_error(config):
    del config
    raise jax.errors.JaxRuntimeError("INTERNAL: something else")

  monkeypatch.setattr(aot, "compile_for_topology", other_error)
  with pytest.raises(jax.errors.JaxRuntimeError, match="INTERNAL"):
    aot.compile_only(config)
