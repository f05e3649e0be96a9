"""Hugging Face import onto a 2 x 2 x 2 mesh of fake CPU devices, against one device, and
on two processes (127.0.0.1) that each read only the parts of the tensors they hold.

Checkpoints are written with `transformers` in this process; the import runs in
subprocesses that set `--xla_force_host_platform_device_count` before importing jax.
"""

import json
import math
import os
import socket
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
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " " + "--xla_force_host_platform_device_count=8"
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
  single_stats = {}
  config, single = hf_import.load(directory, stats=single_stats)
  out = {"specs": {}, "custom_specs": {}, "equal": True, "stats": {"single": single_stats}}
  for rules in (None, custom_rules):
    stats = {}
    _, params = hf_import.load(directory, mesh=mesh, rules=rules, stats=stats)
    out["stats"]["default" if rules is None else "custom"] = stats
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


# Two processes x 2 fake devices; mesh (data 1, fsdp 2, tensor 2) with the fsdp axis across
# the processes, so each process holds half of every fsdp-sharded parameter.
_TWO_PROCESS_SCRIPT = r"""
import json, os, sys
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " " + "--xla_force_host_platform_device_count=2"
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
port, process_id, directory = sys.argv[1], int(sys.argv[2]), sys.argv[3]
jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=process_id,
                           initialization_timeout=120)
import numpy as np
from jax.experimental import multihost_utils
from mopd_jax import sharding
from mopd_jax.models import hf_import

assert jax.device_count() == 4 and jax.local_device_count() == 2
mesh = sharding.make_mesh((1, 2, 2))
stats = {}
_, params = hf_import.load(directory, mesh=mesh, stats=stats)
gathered = multihost_utils.process_allgather(params, tiled=True)
_, single = hf_import.load(directory)
equal = all(np.array_equal(np.asarray(a), np.asarray(b))
            for a, b in zip(jax.tree.leaves(single), jax.tree.leaves(gathered)))
fsdp_rows = sorted(sorted({d.process_index for d in mesh.devices[0, i].flat}) for i in range(2))
print("RESULT" + json.dumps({"equal": equal, "stats": stats, "fsdp_rows": fsdp_rows}))
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


@pytest.fixture(scope="module")
def eight_device_results(checkpoints):
  """Per checkpoint: shardings, equality and logit errors, and the bytes each import read."""
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
  return json.loads(line[len("RESULT") :])


def test_import_on_eight_devices_matches_one_device(checkpoints, eight_device_results):
  results = eight_device_results
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


def test_import_counts_each_byte_once_on_one_process(eight_device_results):
  """Without a mesh, and on a mesh whose devices are all local, every checkpoint byte is
  read exactly once (devices holding the same replicated part share one read)."""
  for name, res in eight_device_results.items():
    total = res["stats"]["single"]["checkpoint_bytes"]
    assert total > 0, name
    for key in ("single", "default", "custom"):
      assert res["stats"][key] == {"bytes_read": total, "checkpoint_bytes": total}, (name, key)


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_each_of_two_processes_reads_only_its_half(checkpoints):
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
  port = _free_port()
  procs = [subprocess.Popen([sys.executable, "-c", _TWO_PROCESS_SCRIPT, str(port), str(i),
                             checkpoints[0]], cwd=root, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for i in range(2)]
  outs = []
  try:
    for proc in procs:
      stdout, stderr = proc.communicate(timeout=300)
      assert proc.returncode == 0, stderr[-4000:]
      outs.append(json.loads(next(l for l in stdout.splitlines()
                                  if l.startswith("RESULT"))[len("RESULT"):]))
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
  # The fsdp axis runs across the processes (each fsdp row lives on one process).
  assert outs[0]["fsdp_rows"] == [[0], [1]]
  # Every tensor but the q/k norm scales (float32 [head_dim] per layer, replicated) has an
  # axis split over fsdp, so each process reads half of it.
  replicated = _SHAPES["num_hidden_layers"] * 2 * _SHAPES["head_dim"] * 4
  for out in outs:
    assert out["equal"]
    read, total = out["stats"]["bytes_read"], out["stats"]["checkpoint_bytes"]
    assert read == (total - replicated) // 2 + replicated, (read, total)
    assert read < 0.51 * total
