"""Hugging Face import onto a 2 x 2 x 2 mesh of fake CPU devices, against one device.

Checkpoints are written with `transformers` in this process; the import runs in a
subprocess that sets `--xla_force_host_platform_device_count=8` before importing jax.
"""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
import transformers

_SHAPES = dict(
    vocab_size=98,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    intermediate_size=96,
)

_SCRIPT = r"""
import json, os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
import flax.linen as nn
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from mopd_jax import sharding
from mopd_jax.models import hf_import, transformer

assert len(jax.devices()) == 8
mesh = sharding.make_mesh((2, 2, 2))
# A non-default rule list: embed replicated, MLP over 'data', heads and vocab over 'tensor'.
custom_rules = (("embed", None), ("vocab", "tensor"), ("heads", "tensor"),
                ("kv_heads", "tensor"), ("mlp", "data"), ("head_dim", None))
rng = np.random.default_rng(0)
tokens = rng.integers(1, 98, (4, 24))
mask = np.arange(24)[None] >= np.array([[0], [5], [11], [3]])  # left padding
results = {}
for directory in sys.argv[1:]:
  config, single = hf_import.load(directory)
  out = {"specs": {}, "custom_specs": {}, "equal": True}
  for rules in (None, custom_rules):
    _, params = hf_import.load(directory, mesh=mesh, rules=rules)
    expected = nn.logical_to_mesh(transformer.param_logical_axes(config),
                                  sharding.DEFAULT_RULES if rules is None else rules)
    flat_expected = dict(jax.tree_util.tree_leaves_with_path(
        expected, is_leaf=lambda x: isinstance(x, P)))
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
      assert isinstance(leaf.sharding, NamedSharding), path
      assert leaf.sharding.mesh == mesh, path
      assert leaf.sharding.spec == flat_expected[path], (path, leaf.sharding.spec)
      key = "specs" if rules is None else "custom_specs"
      out[key][jax.tree_util.keystr(path)] = list(leaf.sharding.spec)
    for a, b in zip(jax.tree.leaves(single), jax.tree.leaves(params)):
      out["equal"] &= bool(np.array_equal(np.asarray(a), np.asarray(b)))
    ref = np.asarray(transformer.logits(config, single, tokens, mask))
    got = np.asarray(jax.jit(transformer.logits, static_argnums=0)(config, params, tokens, mask))
    out["max_err_" + ("default" if rules is None else "custom")] = float(
        np.abs(got - ref)[mask].max())
  out["logit_scale"] = float(np.abs(ref[mask]).max())
  results[os.path.basename(directory)] = out
print("RESULT" + json.dumps(results))
"""


def _randomize(model, seed):
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, param in model.named_parameters():
      noise = torch.randn(param.shape, generator=gen)
      if name.endswith("norm.weight") or name.endswith(".bias"):
        param.copy_(1 + 0.2 * noise)
      else:
        param.copy_(noise / math.sqrt(param.shape[-1]))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
  root = tmp_path_factory.mktemp("hf_sharded")
  families = {
      # Untied Qwen3 (q/k norms, separate LM head), in several files with an index.
      "qwen3": (
          transformers.Qwen3Config,
          transformers.Qwen3ForCausalLM,
          dict(tie_word_embeddings=False),
          "40KB",
      ),
      # Tied Qwen2.5 (q/k/v biases), one file.
      "qwen2": (
          transformers.Qwen2Config,
          transformers.Qwen2ForCausalLM,
          dict(tie_word_embeddings=True),
          None,
      ),
  }
  out = []
  for seed, (name, (config_cls, model_cls, extra, shard_size)) in enumerate(families.items()):
    model = model_cls(config_cls(**_SHAPES, **extra))
    _randomize(model, seed)
    kwargs = {"max_shard_size": shard_size} if shard_size else {}
    model.save_pretrained(str(root / name), safe_serialization=True, **kwargs)
    out.append(str(root / name))
  return out


def test_import_on_eight_devices_matches_one_device(checkpoints):
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = subprocess.run(
      [sys.executable, "-c", _SCRIPT, *checkpoints],
      cwd=root,
      capture_output=True,
      text=True,
      timeout=600,
  )
  assert out.returncode == 0, out.stderr[-4000:]
  line = next(l for l in out.stdout.splitlines() if l.startswith("RESULT"))
  results = json.loads(line[len("RESULT") :])
  assert set(results) == {"qwen3", "qwen2"}
  assert os.path.exists(os.path.join(checkpoints[0], "model.safetensors.index.json"))
  for name, res in results.items():
    assert res["equal"], name
    assert res["logit_scale"] > 1.0
    assert res["max_err_default"] < 1e-5, (name, res["max_err_default"])
    assert res["max_err_custom"] < 1e-5, (name, res["max_err_custom"])
  # The default rules split parameters as intended (independent of the rule lookup above).
  specs = results["qwen3"]["specs"]
  assert specs["['embedding']"] == ["tensor", "fsdp"]
  assert specs["['lm_head']"] == ["fsdp", "tensor"]
  # Stacked per-layer parameters: the leading `layers` axis is not split.
  assert specs["['layers']['attn']['q_proj']['kernel']"] == [None, "fsdp", "tensor", None]
  assert specs["['layers']['attn']['o_proj']['kernel']"] == [None, "tensor", None, "fsdp"]
  assert specs["['layers']['attn']['q_norm']['scale']"] == [None, None]
  assert specs["['layers']['mlp']['down_proj']['kernel']"] == [None, "tensor", "fsdp"]
  assert results["qwen2"]["specs"]["['layers']['attn']['k_proj']['bias']"] == [
      None, "tensor", None]
  custom = results["qwen3"]["custom_specs"]
  assert custom["['layers']['mlp']['up_proj']['kernel']"] == [None, None, "data"]
  assert custom["['embedding']"] == ["tensor", None]
