"""The sampler's decode layout: weights resharded once per call to `DECODE_RULES`.

Samples equal those of the training layout for the same key (float32, on one device and on
8 fake CPU devices), and the HLO accounting and the memory plan count what they claim. The
fused step compiled for a TPU topology is checked in `test_tpu_compile` (the tests that
need libtpu live in that one module).
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mopd_jax import memory_plan, settings, sharding, topology
from mopd_jax.models import transformer as T
from mopd_jax.sampling import Sampler

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
                            ("fsdp_tensor", "tensor", (1, 8, 1))):
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
  for name in ("mesh_train", "mesh_tensor", "fsdp_tensor"):
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
  for name in ("mesh_tensor", "fsdp_tensor"):
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
      "all-reduce": {"count": 1, "bytes": 4 * 4},
      # In the loop over 3 layers nested in the decode loop: 3 per decode step.
      "all-gather": {"count": 3, "bytes": 3 * 8 * 16 * 2}}
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
  assert settings.SamplingSettings().decode_layout == "tensor"
  with pytest.raises(settings.ConfigError, match=r"decode_layout.*'fsdp'.*'tensor'"):
    settings.SamplingSettings(decode_layout="fsdp")
