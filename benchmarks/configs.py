"""The project's run configs (`configs/<name>.py`) for the benchmarks and the tests.

Free of side effects on purpose: the test suite's `conftest.py` sets environment
variables for its own processes (a persistent compilation cache, a lower XLA optimization
level), which would distort a benchmark that imported it.
"""

import importlib.util
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(name: str = "code", arg=None, **overrides):
  """`get_config(arg)` of configs/<name>.py with dotted-key overrides
  (`load_config(**{"data.batch_size": 8})`)."""
  spec = importlib.util.spec_from_file_location(f"configs_{name}",
                                                os.path.join(ROOT, "configs", f"{name}.py"))
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
