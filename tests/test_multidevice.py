"""The same step on 8 fake CPU devices (mesh 2 x 2 x 2) and on one device."""

import json
import os
import subprocess
import sys

import pytest

_SCRIPT = r"""
import os, sys, json
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " " + "--xla_force_host_platform_device_count=8"
import jax, numpy as np
sys.path.insert(0, os.getcwd())
from mopd_jax import train
from mopd_jax.verifiers.result import Result
from tests.conftest import tiny_config

assert len(jax.devices()) == 8
rows_seen = []  # rows per host call (identical responses among them are scored once)
def scorer(texts, refs):
  return [Result(reward=float(sum(map(ord, t)) % 2), status="ok") for t in texts]

results = {}
for name, shape, devices in (("one", (1, 1, 1), jax.devices()[:1]),
                             ("eight", (2, 2, 2), jax.devices())):
  config = tiny_config(sys.argv[1], **{"mesh.shape": shape})
  s = train.setup(config, score_batch=scorer, devices=devices)
  verifier = s.host_verifier
  def recording(ids, tokens, lengths, verifier=verifier):
    rows_seen.append(len(ids))
    return verifier(ids, tokens, lengths)
  s.host_verifier = recording
  state = s.init_state()
  step = s.train_step()
  rows_seen.clear()
  metrics = []
  for i in range(2):
    state, m = step(state, s.put_batch(s.train_batches.batch(i)))
    metrics.append({k: float(v) for k, v in jax.device_get(m).items()})
  shardings = {jax.tree_util.keystr(p): [str(a) for a in x.sharding.spec]
               for p, x in jax.tree_util.tree_leaves_with_path(state.params)}
  results[name] = {"metrics": metrics, "rows_seen": list(rows_seen),
                   "params": [np.asarray(x).ravel()[:50].tolist()
                              for x in jax.tree.leaves(state.params)],
                   "shardings": shardings,
                   "num_devices": len(state.params["embedding"].sharding.device_set)}
print("RESULT" + json.dumps(results))
"""


@pytest.mark.slow
def test_step_on_eight_devices_matches_one_device(tiny_base_dir):
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = subprocess.run([sys.executable, "-c", _SCRIPT, tiny_base_dir], cwd=root,
                       capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stderr[-4000:]
  line = next(l for l in out.stdout.splitlines() if l.startswith("RESULT"))
  res = json.loads(line[len("RESULT"):])
  one, eight = res["one"], res["eight"]
  assert eight["num_devices"] == 8
  # Parameters are really split: embedding over (tensor, fsdp), MLP over tensor.
  assert eight["shardings"]["['embedding']"] == ["tensor", "fsdp"]
  assert "tensor" in eight["shardings"]["['layers']['mlp']['up_proj']['kernel']"]
  # Each row is verified once: 16 rows per step, in 4 shards of 4 (not 8 calls).
  assert eight["rows_seen"] == [4, 4, 4, 4] * 2
  assert one["rows_seen"] == [16, 16]
  for m1, m8 in zip(one["metrics"], eight["metrics"]):
    assert m1.keys() == m8.keys()
    for key in m1:
      assert m8[key] == pytest.approx(m1[key], rel=1e-3, abs=1e-5), key
  for a, b in zip(one["params"], eight["params"]):
    assert a == pytest.approx(b, rel=1e-3, abs=1e-5)
