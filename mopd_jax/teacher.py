"""The teacher: an EMA copy of the student (default), a frozen copy (rate 0), or an
external model with the same vocabulary (classic on-policy distillation; frozen).

A self-teacher's parameters are kept in float32 whatever the student's parameter dtype,
so that small EMA rates (0.05 by default) are not lost to bf16 rounding.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

TEACHER_MODES = ("ema", "frozen", "external")


def init_teacher(student_params):
  """float32 copy of the student's parameters."""
  return jax.tree.map(lambda p: jnp.asarray(p, jnp.float32), student_params)


def ema_update(teacher_params, student_params, rate: float, apply):
  """theta_T <- (1 - rate) theta_T + rate theta_S where `apply` (a bool scalar) holds.

  `apply` is False after a step whose gradient norm was not finite: the teacher then
  keeps its parameters. rate == 0 (frozen teacher) returns the teacher unchanged.
  """
  if rate == 0.0:
    return teacher_params

  def mix(t, s):
    new = (1.0 - rate) * t + rate * s.astype(jnp.float32)
    return jnp.where(apply, new, t)

  return jax.tree.map(mix, teacher_params, student_params)
