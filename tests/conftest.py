"""Shared fixtures: tiny models and a tiny demo base model built once per session."""

import dataclasses
import os

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


@pytest.fixture(scope="session")
def tiny_base_dir(tmp_path_factory):
  """A demo base model with a short pretraining recipe (same code path as the demo)."""
  from mopd_jax import demo_base  # pylint: disable=import-outside-toplevel
  directory = str(tmp_path_factory.mktemp("demo_base"))
  recipe = dataclasses.replace(demo_base.BaseRecipe(), steps=40, embed_dim=48,
                               head_dim=12, mlp_dim=96)
  demo_base.ensure(directory, recipe)
  return directory


def load_config(name="code", arg=None, **overrides):
  """get_config(arg) of configs/<name>.py with dotted-key overrides."""
  import importlib.util  # pylint: disable=import-outside-toplevel
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  spec = importlib.util.spec_from_file_location(f"configs_{name}",
                                                os.path.join(root, "configs", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(arg)
  for key, value in overrides.items():
    node = config
    parts = key.split(".")
    for part in parts[:-1]:
      node = node[part]
    setattr(node, parts[-1], value)
  return config


def tiny_config(base_dir, **overrides):
  """A small, fast run config on the tiny base model."""
  settings = {
      "model.cache_dir": base_dir, "data.batch_size": 4, "sampling.num_samples": 4,
      "sampling.max_response_len": 28, "peers.peer_cap": 28, "eval.num_prompts": 8,
      "eval.num_samples": 2, "total_steps": 3, "checkpoint_every": 0, "eval_every": 0,
      "loss.chunk_size": 8,
  }
  settings.update(overrides)
  return load_config(**settings)
