"""The start-up memory plan: per-device bytes, and a clear stop when a step cannot fit."""

import math

import jax
import numpy as np
import pytest

from mopd_jax import memory_plan, settings, train
from mopd_jax.models import transformer
from tests.conftest import tiny_config


def test_kv_cache_bytes_by_hand():
  model = transformer.ModelConfig(vocab_size=10, num_layers=3, embed_dim=8, num_heads=4,
                                  num_kv_heads=2, head_dim=6, mlp_dim=16, dtype="bfloat16")
  got = memory_plan.kv_cache_bytes(model, prompts=2, rows=8, prompt_len=7,
                                   response_len=11, batch_devices=2)
  # 3 layers x (K, V) x 2 heads x 6 dims x 2 bytes x (2 x 7 + 8 x 11 tokens) / 2 devices
  assert got == 3 * 2 * 2 * 6 * 2 * (2 * 7 + 8 * 11) // 2


def test_plan_that_does_not_fit_names_the_knobs():
  plan = memory_plan.MemoryPlan(params=2**30, opt_state=2**31, teacher=2**30, kv_cache=0,
                                temp=5 * 2**30, argument=4 * 2**30, output=4 * 2**30,
                                device_limit=8 * 2**30, device_kind="TPU v5 lite")
  assert plan.total == 9 * 2**30 and not plan.fits()
  with pytest.raises(settings.ConfigError,
                     match=r"9\.0 GiB.*TPU v5 lite has 8\.0 GiB.*micro_batch_rows.*mesh\.shape"):
    memory_plan.check_fits(plan, settings.ConfigError)
  memory_plan.check_fits(memory_plan.MemoryPlan(**{**plan.__dict__, "device_limit": None}))


@pytest.fixture(scope="module")
def compiled_plan(tiny_base_dir):
  s = train.setup(tiny_config(tiny_base_dir))
  return s, s.compile_step()


def test_plan_of_the_compiled_step(compiled_plan):
  s, (compiled, plan) = compiled_plan
  param_bytes = sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize
                    for x in jax.tree.leaves(s.state_shapes.params))
  assert plan.params == param_bytes
  assert plan.opt_state >= 2 * param_bytes  # AdamW moments
  assert plan.teacher == param_bytes  # float32 self-teacher of a float32 student
  # The step's arguments are the state and the batch.
  assert plan.argument >= plan.params + plan.opt_state + plan.teacher
  assert plan.temp > 0 and plan.kv_cache > 0
  assert "step temporary" in plan.table()


def test_run_stops_before_allocating_when_the_step_cannot_fit(tiny_base_dir, tmp_path,
                                                             monkeypatch):
  monkeypatch.setattr(memory_plan, "device_memory_limit", lambda device: 1024)
  with pytest.raises(settings.ConfigError, match="micro_batch_rows"):
    train.run(tiny_config(tiny_base_dir), str(tmp_path))
  assert not (tmp_path / "checkpoints").exists()  # stopped before any state or checkpoint
