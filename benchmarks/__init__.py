"""Benchmarks (`python -m benchmarks.<name>`); results in RESULTS.md."""

from mopd_jax import topology

# As `python -m mopd_jax.main` does: on a CPU host with libtpu installed, run JAX on the
# CPU instead of printing TPU initialisation errors first (JAX has not started yet).
topology.skip_absent_tpu()
