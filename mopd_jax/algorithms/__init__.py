"""Training algorithms, one module each, registered by name (see `registry`).

Adding one: a module with a subclass of `Algorithm` (or of `distillation.Distillation` /
`policy.PolicyLoss`) decorated with `@register("name")`; `config.algorithm.name=name`
then selects it. Importing this package imports no JAX; the built-ins load on first
lookup.
"""

from mopd_jax.algorithms.registry import Algorithm, get, names, register

__all__ = ["Algorithm", "get", "names", "register"]
