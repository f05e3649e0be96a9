"""The sampler's decode layouts: weights resharded once per call to `DECODE_RULES` or
`WIDE_DECODE_RULES`, and the memory plan's choice between them ('auto').

Samples equal those of the training layout for the same key (float32, on one device and on
8 fake CPU devices), and the HLO accounting and the memory plan count what they claim. The
fused step compiled for a TPU topology is checked in `test_tpu_compile` (the tests that
need libtpu live in that one module).
"""

import dataclasses
import json
import os
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mopd_jax import memory_plan, sampling, settings, sharding, topology, train_setup
from mopd_jax.models import transformer as T
from mopd_jax.sampling import Sampler
from tests.conftest import load_config

CFG = T.ModelConfig(vocab_size=64, num_layers=2, embed_dim=32, num_heads=4,
                    num_kv_heads=2, head_dim=8, mlp_dim=64, qk_norm=True,
                    tie_embeddings=False, remat_policy="none",
                    axis_rules=sharding.DEFAULT_RULES)

# Samples of one sampler call, by layout and mesh; run in its own process, which fakes 8
# CPU devices before JAX starts. Prints one JSON line.
_SCRIPT = r"""
import dataclasses, json, os, sys
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " " + "--xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, os.getcwd())
import jax, numpy as np
from mopd_jax import sharding, topology
from mopd_jax.models import transformer as T
from mopd_jax.sampling import Sampler
from tests.test_decode_layout import CFG, sample_inputs

params, tokens, mask = sample_inputs()
key = jax.random.PRNGKey(5)
out = {}
for name, layout, shape in (("one_device", "train", None), ("mesh_train", "train", (2, 2, 2)),
                            ("mesh_tensor", "tensor", (2, 2, 2)),
                            ("fsdp_tensor", "tensor", (1, 8, 1)),
                            ("mesh_wide", "wide", (2, 2, 2))):
  cfg = CFG if shape else dataclasses.replace(CFG, axis_rules=None)  # no mesh, no rules
  sampler = Sampler(cfg, max_new_tokens=9, stop_ids=(1,), pad_id=0, temperature=1.0,
                    num_samples=2, decode_block=4, decode_layout=layout)
  if shape is None:
    result = jax.jit(sampler.__call__)(params, tokens, mask, key)
    text = ""
  else:
    mesh = sharding.make_mesh(shape)
    p_sh = sharding.logical_to_shardings(T.param_logical_axes(CFG), params, mesh)
    fn = sharding.UnderMesh(jax.jit(sampler.__call__, in_shardings=(
        p_sh, sharding.batch_sharding(mesh, 2), sharding.batch_sharding(mesh, 2),
        sharding.replicated(mesh))), mesh)
    args = (jax.device_put(params, p_sh), tokens, mask, key)
    result = fn(*args)
    text = fn.lower(*args).compile().as_text()
  result = jax.device_get(result)
  out[name] = {"tokens": result.tokens.tolist(), "logprobs": result.logprobs.tolist(),
               "lengths": result.lengths.tolist(),
               "decode_step": topology.decode_step_collectives(text),
               "reshard": topology.scoped_collectives(text, "decode_layout")}
print("RESULT" + json.dumps(out))
"""


def sample_inputs():
  """float32 parameters (larger than the init, so samples vary) and 8 left-padded
  prompts [8, 7]."""
  p = T.init_params(CFG, jax.random.PRNGKey(0))
  leaves, tree = jax.tree.flatten(p)
  keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
  params = jax.tree.unflatten(tree, [x + 0.3 * jax.random.normal(k, x.shape)
                                     for x, k in zip(leaves, keys)])
  tokens = np.asarray(jax.random.randint(jax.random.PRNGKey(2), (8, 7), 3, CFG.vocab_size))
  mask = np.arange(7)[None, :] >= (7 - np.array([4, 7, 2, 5, 1, 6, 7, 3]))[:, None]
  return params, np.where(mask, tokens, 0).astype(np.int32), mask


def test_decode_layout_samples_as_the_training_layout_on_one_device():
  params, tokens, mask = sample_inputs()
  mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
  outs = {}
  for layout in ("train", "tensor"):
    sampler = Sampler(CFG, max_new_tokens=9, stop_ids=(1,), pad_id=0, temperature=1.0,
                      num_samples=2, decode_block=4, decode_layout=layout)
    fn = sharding.UnderMesh(jax.jit(sampler.__call__), mesh)
    outs[layout] = jax.device_get(fn(params, tokens, mask, jax.random.PRNGKey(5)))
  np.testing.assert_array_equal(outs["tensor"].tokens, outs["train"].tokens)
  np.testing.assert_allclose(outs["tensor"].logprobs, outs["train"].logprobs, atol=1e-5)
  assert len(set(map(tuple, outs["train"].tokens.tolist()))) > 8  # varied samples
  with pytest.raises(ValueError, match="decode_layout must be one of"):
    Sampler(CFG, max_new_tokens=2, stop_ids=(1,), pad_id=0, decode_layout="fsdp")


@pytest.mark.slow
def test_decode_layout_samples_as_the_training_layout_on_eight_devices():
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = subprocess.run([sys.executable, "-c", _SCRIPT], cwd=root, capture_output=True,
                       text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-4000:]
  line = next(l for l in out.stdout.splitlines() if l.startswith("RESULT"))
  res = json.loads(line[len("RESULT"):])
  want = res["one_device"]
  for name in ("mesh_train", "mesh_tensor", "fsdp_tensor", "mesh_wide"):
    assert res[name]["tokens"] == want["tokens"], name
    assert res[name]["lengths"] == want["lengths"], name
    np.testing.assert_allclose(res[name]["logprobs"], want["logprobs"], atol=1e-5,
                               err_msg=name)
  # In the training layout a decode step gathers the fsdp-split weights; in the decode
  # layout the weights were gathered once, before the loop, and a step communicates no
  # weight: without a tensor axis nothing at all; with one, the tensor-parallel
  # reductions and the sampler's gathers of vocabulary-split rows (activations of the 4
  # rows per device: about 2 KB here, where the train layout gathers about 24 KB of
  # weights, a quarter of the model's float32 bytes, at every step).
  gathered = lambda name: res[name]["decode_step"]["all-gather"]["bytes"]  # noqa: E731
  assert gathered("mesh_train") > 4 * CFG.num_params / 8
  assert 5 * gathered("mesh_tensor") < gathered("mesh_train")
  assert res["fsdp_tensor"]["decode_step"] == {}
  # 'wide' samples the same tokens; at this toy size its activations (16 rows of
  # vocabulary-split logits) are as large as a weight matrix, so that it gathers no weight
  # is checked where sizes tell them apart (`test_tpu_compile`, compiled for a TPU).
  for name in ("mesh_tensor", "fsdp_tensor", "mesh_wide"):
    assert res[name]["reshard"]["all-gather"]["count"] > 0, name


# ------------------------------------------------- HLO accounting and the memory plan.

_HLO = """HloModule jit_step

%layer_cond (p: (s32[], bf16[8,4])) -> pred[] {
  %p = (s32[], bf16[8,4]) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %n = s32[]{:T(128)} constant(3)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

%layer_body (p: (s32[], bf16[8,4])) -> (s32[], bf16[8,4]) {
  %ag = bf16[8,16]{1,0} all-gather(bf16[8,4]{1,0} %x), dimensions={1}, metadata={op_name="jit(step)/decode/while/body/Decoder/while/body/dot"}
  ROOT %t = (s32[], bf16[8,4]) tuple(%i, %x)
}

%decode_body (p: (s32[], bf16[8,4])) -> (s32[], bf16[8,4]) {
  %ar = f32[4]{0} all-reduce(f32[4]{0} %a), to_apply=%add, metadata={op_name="jit(step)/decode/while/body/x"}
  ROOT %w = (s32[], bf16[8,4]) while(%t), condition=%layer_cond, body=%layer_body, metadata={op_name="jit(step)/decode/while/body/Decoder/while"}
}

ENTRY %main (t: (s32[], bf16[8,4])) -> f32[2,4] {
  %ag2 = bf16[16,4]{1,0} all-gather(bf16[4,4]{1,0} %y), dimensions={0}, metadata={op_name="jit(step)/decode_layout/convert_element_type"}
  ROOT %w = (s32[], bf16[8,4]) while(%t), condition=%cond, body=%decode_body, metadata={op_name="jit(step)/decode/while"}
}
"""


def test_decode_step_collectives_count_nested_loops_by_their_trip_count():
  assert topology.decode_step_collectives(_HLO) == {
      "all-reduce": {"count": 1, "bytes": 4 * 4, "largest": 4 * 4},
      # In the loop over 3 layers nested in the decode loop: 3 per decode step.
      "all-gather": {"count": 3, "bytes": 3 * 8 * 16 * 2, "largest": 8 * 16 * 2}}
  assert topology.scoped_collectives(_HLO, "decode_layout") == {
      "all-gather": {"count": 1, "bytes": 16 * 4 * 2}}


def test_memory_plan_counts_the_decode_copy_of_the_weights():
  model = T.ModelConfig(vocab_size=8, num_layers=2, embed_dim=4, num_heads=2,
                        num_kv_heads=1, head_dim=2, mlp_dim=6, dtype="bfloat16",
                        tie_embeddings=True)
  mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
  shapes = jax.eval_shape(lambda: T.init_params(model, jax.random.PRNGKey(0)))
  # float32 parameters: a bfloat16 copy of all of them in either layout on one device.
  bf16 = 2 * model.num_params
  assert memory_plan.decode_weight_bytes(model, shapes, mesh, "tensor") == bf16
  assert memory_plan.decode_weight_bytes(model, shapes, mesh, "train") == bf16
  narrow = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.bfloat16), shapes)
  assert memory_plan.decode_weight_bytes(model, narrow, mesh, "train") == 0
  assert memory_plan.decode_weight_bytes(model, narrow, mesh, "tensor") == bf16
  plan = memory_plan.MemoryPlan(params=1, opt_state=1, teacher=1, kv_cache=1, temp=1,
                                argument=1, output=1, device_limit=None, device_kind="cpu",
                                decode_weights=bf16, decode_layout="tensor")
  assert "decode weights (in temporary)" in plan.table()
  assert "decode layout                     tensor" in plan.table()


def test_decode_layout_setting_names_the_allowed_values():
  assert settings.SamplingSettings().decode_layout == "auto"
  assert sampling.sampler_layout("auto") == "tensor"  # until a memory plan says otherwise
  assert sampling.sampler_layout("wide") == "wide"
  with pytest.raises(settings.ConfigError, match=r"decode_layout.*'fsdp'.*'tensor'.*'wide'"):
    settings.SamplingSettings(decode_layout="fsdp")
  with pytest.raises(ValueError, match=r"'auto' is resolved from the memory plan"):
    Sampler(CFG, max_new_tokens=2, stop_ids=(1,), pad_id=0, decode_layout="auto")


def test_wide_layout_splits_the_decode_copy_over_tensor_and_fsdp():
  model = T.ModelConfig(vocab_size=16, num_layers=2, embed_dim=8, num_heads=8,
                        num_kv_heads=4, head_dim=2, mlp_dim=16, dtype="bfloat16",
                        tie_embeddings=True)
  mesh = jax.sharding.AbstractMesh((2, 4, 2), sharding.MESH_AXES)
  shapes = jax.eval_shape(lambda: T.init_params(model, jax.random.PRNGKey(0)))
  # bfloat16 elements per device, by hand. 'tensor' (2 devices): vocab, heads, key/value
  # heads and MLP width halved. 'wide' (tensor x fsdp = 8): split 8 ways, except the 4
  # key/value heads, which 8 does not divide: split over 'tensor' only.
  tensor = (8 * 8 + 8 + 2 * (2 * 8 * 2 * 2) + 2 * (2 * 8 * 4 * 2) + 2 * 16
            + 3 * (2 * 8 * 8))
  wide = (2 * 8 + 8 + 2 * (2 * 8 * 2 * 2) + 2 * (2 * 8 * 1 * 2) + 2 * 16
          + 3 * (2 * 8 * 2))
  assert memory_plan.decode_weight_bytes(model, shapes, mesh, "tensor") == 2 * tensor
  assert memory_plan.decode_weight_bytes(model, shapes, mesh, "wide") == 2 * wide
  # The KV cache: rows over data x fsdp and heads over tensor, or rows over data only and
  # heads over as much of tensor x fsdp as divides them.
  assert memory_plan.kv_cache_split(model, mesh, "tensor") == {"batch_devices": 8,
                                                               "head_devices": 2}
  assert memory_plan.kv_cache_split(model, mesh, "wide") == {"batch_devices": 2,
                                                             "head_devices": 2}
  wider = jax.sharding.AbstractMesh((1, 4, 1), sharding.MESH_AXES)
  assert memory_plan.kv_cache_split(model, wider, "wide") == {"batch_devices": 1,
                                                              "head_devices": 4}
  # Query heads that tensor x fsdp does not divide cannot decode 'wide': an error that
  # names the parameter and the sizes.
  odd = jax.sharding.AbstractMesh((1, 16, 1), sharding.MESH_AXES)
  with pytest.raises(ValueError, match=r"Parameter .*_proj.*'heads' \(size 8\).*size 16"):
    memory_plan.decode_weight_bytes(model, shapes, odd, "wide")


@dataclasses.dataclass(frozen=True)
class _StepConfig:  # the one field of StepConfig that the layout choice replaces
  sampling: settings.SamplingSettings


def _choosing_setup(monkeypatch, totals, limit=100, fsdp=4, wide_error=None):
  """A Setup whose compile returns a plan of total `totals[layout]` against `limit`,
  recording the layouts it compiled (no model is compiled)."""
  st = settings.from_config(load_config())
  compiled = []

  def compile_with(self, layout):
    self._set_decode_layout(layout)  # pylint: disable=protected-access
    compiled.append(layout)
    if layout == "wide" and wide_error:
      raise wide_error
    return "compiled", memory_plan.MemoryPlan(
        params=0, opt_state=0, teacher=0, kv_cache=0, temp=totals[layout], argument=0,
        output=0, device_limit=limit, device_kind="chip", decode_layout=layout)

  monkeypatch.setattr(train_setup.Setup, "_compile_with", compile_with)
  s = train_setup.Setup(
      settings=st, mesh=types.SimpleNamespace(shape={"data": 1, "fsdp": fsdp, "tensor": 1}),
      tokenizer=None, model_cfg=None, step_cfg=_StepConfig(st.sampling), optimizer=None,
      schedule=None, base_params=None, external_teacher_params=None, state_shapes=None,
      shardings=None, train_batches=None, eval_batches=None, host_verifier=None,
      pieces=None)
  return s, compiled


@pytest.mark.parametrize("totals, limit, fsdp, wide_error, want_compiled, want", [
    ({"tensor": 90, "wide": 60}, 100, 4, None, ["tensor"], "tensor"),  # tensor fits
    ({"tensor": 120, "wide": 60}, 100, 4, None, ["tensor", "wide"], "wide"),
    ({"tensor": 120, "wide": 110}, 100, 4, None, ["tensor", "wide"], "wide"),  # smaller
    ({"tensor": 120, "wide": 130}, 100, 4, None, ["tensor", "wide"], "tensor"),
    ({"tensor": 120, "wide": 60}, 100, 1, None, ["tensor"], "tensor"),  # no fsdp axis
    ({"tensor": 120, "wide": 60}, 100, 4, ValueError("heads"), ["tensor", "wide"],
     "tensor"),  # 'wide' does not apply (query heads that do not divide)
])
def test_auto_decode_layout_falls_back_to_wide_only_when_tensor_does_not_fit(
    monkeypatch, totals, limit, fsdp, wide_error, want_compiled, want):
  s, compiled = _choosing_setup(monkeypatch, totals, limit, fsdp, wide_error)
  _, plan = s.compile_step()
  assert compiled == want_compiled
  assert plan.decode_layout == want
  # The choice is the setup's from now on: the evaluation sampler and the step use it.
  assert s.settings.sampling.decode_layout == want
  assert s.step_cfg.sampling.decode_layout == want


def test_an_explicit_decode_layout_is_compiled_as_given(monkeypatch):
  s, compiled = _choosing_setup(monkeypatch, {"train": 500})
  s._set_decode_layout("train")  # pylint: disable=protected-access
  _, plan = s.compile_step()
  assert compiled == ["train"] and plan.decode_layout == "train" and not plan.fits()
