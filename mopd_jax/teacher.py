"""The teacher: an EMA copy of the student (default), a frozen copy (rate 0), a trust
region between the frozen copy and the current student, or an external model with the
same vocabulary (classic on-policy distillation; frozen).

Trust region (MOPD spec §4): the teacher's logits are
``lerp(reference, student, rate) = (1 - rate) * reference + rate * student``, where the
reference is the frozen initial student (kept in the teacher slot, never updated) and
the student is the current student under stop-gradient; both read the teacher prompt,
and both logits are taken before the distillation temperature and top-k. Extra cost per
step against 'frozen': one more teacher-length forward of the student (no backward) and
one more vocabulary projection per loss chunk. Rate 0 is the frozen teacher, rate 1 the
student itself reading the context.

A self-teacher's parameters are kept in float32 whatever the student's parameter dtype,
so that small EMA rates (0.05 by default) are not lost to bf16 rounding.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


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


def trust_region_terms(rate: float) -> tuple[tuple[str, float], ...]:
  """The (source, weight) terms whose weighted logits sum to the trust-region teacher's.

  source is "reference" (the teacher slot) or "student" (the current student under
  stop-gradient); terms of weight 0 are left out, so rate 0 runs exactly the frozen
  teacher and rate 1 only the student.
  """
  terms = (("reference", 1.0 - rate), ("student", rate))
  return tuple((source, weight) for source, weight in terms if weight != 0.0)
