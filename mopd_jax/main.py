r"""Entry point: `python -m mopd_jax.main --config=configs/code.py --workdir=DIR`.

The config file's `get_config(arg)` builds an ml_collections ConfigDict; any key can be
overridden on the command line, e.g. `--config.total_steps=5 --config.optim.lr=3e-4`.
With `--config.mesh.compile_for=TOPOLOGY` (e.g. v5p:4x4x4) the run is only compiled for
that TPU topology and its memory plan printed (`mopd_jax.aot`); no --workdir is needed.
"""

import logging as py_logging
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from mopd_jax import topology

topology.skip_absent_tpu()  # before JAX starts (mopd_jax.train imports it)

from mopd_jax import aot, train  # noqa: E402  pylint: disable=wrong-import-position

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (get_config).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics.")
flags.mark_flags_as_required(["config"])


class _QuietLibraries(py_logging.Filter):
  """Keeps INFO lines of this package; libraries (orbax, jax) speak from WARNING up."""

  def filter(self, record):
    return record.levelno >= py_logging.WARNING or "mopd_jax" in record.pathname


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.INFO)
  logging.get_absl_handler().addFilter(_QuietLibraries())
  config = _CONFIG.value
  if config.mesh.compile_for:
    text, fits = aot.compile_only(config)
    print(text)
    sys.exit(0 if fits else 1)
  if not _WORKDIR.value:
    raise app.UsageError("--workdir is required (except for a compile-only run, "
                         "--config.mesh.compile_for=TOPOLOGY).")
  train.run(config, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
