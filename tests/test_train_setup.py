"""The row-split checks that a real run (`train_setup.setup`) and a compile-only run
(`aot`) share: each batch split over data x fsdp must split evenly, or the run stops
naming the key. An abstract mesh is enough (the checks read only its axis sizes), so no
fake devices are needed."""

import jax
import pytest

from mopd_jax import settings, train_setup
from tests.conftest import load_config

# data x fsdp = 4 row shards.
MESH = jax.sharding.AbstractMesh((2, 2, 1), ("data", "fsdp", "tensor"))


def _settings(**overrides):
  """8 prompts x 4 rollouts = 32 rows per step, 8 held-out prompts."""
  return settings.from_config(load_config(**{
      "data.batch_size": 8, "eval.num_prompts": 8, "sampling.num_samples": 4, **overrides}))


def test_splits_that_divide_the_mesh_pass():
  train_setup.check_batch_split(_settings(), MESH)
  train_setup.check_batch_split(_settings(**{"optim.micro_batch_rows": 16}), MESH)
  # One micro-batch of all rows is the whole batch, checked as data.batch_size.
  train_setup.check_batch_split(_settings(**{"optim.micro_batch_rows": 32}), MESH)


@pytest.mark.parametrize("key,value", [("data.batch_size", 6), ("eval.num_prompts", 6),
                                       ("optim.micro_batch_rows", 2)])
def test_a_split_that_does_not_divide_the_mesh_names_its_key(key, value):
  with pytest.raises(settings.ConfigError,
                     match=rf"config\.{key}={value} must be divisible by the data x fsdp "
                     r"mesh size 4 \(mesh \{'data': 2, 'fsdp': 2, 'tensor': 1\} on v5e:2x2\)"):
    train_setup.check_batch_split(_settings(**{key: value}), MESH, where=" on v5e:2x2")


def test_a_compile_only_run_does_not_check_the_held_out_prompts():
  """It compiles no evaluation sampler, so the held-out prompts are never split there."""
  st = _settings(**{"eval.num_prompts": 6})
  train_setup.check_batch_split(st, MESH, evaluation=False)
  with pytest.raises(settings.ConfigError, match=r"config\.eval\.num_prompts=6"):
    train_setup.check_batch_split(st, MESH)
