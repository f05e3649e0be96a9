"""The knob machinery of `mopd_jax.settings`: checks, `knob`, and the `_Section` base.

A knob is a dataclass field made with `knob(default, ok, allowed, doc)`: its default, its
check and the sentence that names what is allowed sit together. The section modules of
this package build their dataclasses from these pieces (the checks are private to the
package). Imports no JAX.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

from mopd_jax.choices import ConfigError


def _int(lo=None):
  return lambda v: (isinstance(v, int) and not isinstance(v, bool)
                    and (lo is None or v >= lo))


def _num(lo=None, hi=None, lo_open=False, hi_open=False):
  def ok(v):
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
      return False
    if lo is not None and (v <= lo if lo_open else v < lo):
      return False
    return hi is None or (v < hi if hi_open else v <= hi)
  return ok


def _bool(v):
  return isinstance(v, bool)


def _one_of(options):
  return lambda v: v in options


def _optional(ok):
  return lambda v: v is None or ok(v)


def _str(v):
  return isinstance(v, str)


_DTYPES = ("float32", "bfloat16")


def knob(default, ok, allowed: str, doc: str = "", *, kind: type | None = None):
  """A setting: default, validity check, and the phrase naming allowed values.

  kind: the value type of a knob whose default is None, so that the command line can
  still set it (`--config.data.cache_dir=PATH`).
  """
  return dataclasses.field(default=default, metadata={
      "ok": ok, "allowed": allowed, "doc": doc, "kind": kind})


@dataclasses.dataclass(frozen=True)
class _Section:
  """Base: validates every knob, then the cross-knob rules of `check`."""

  NAME: ClassVar[str] = ""

  def __post_init__(self):
    for f in dataclasses.fields(self):
      value = getattr(self, f.name)
      if isinstance(value, list):  # ConfigDict tuples may come back as lists
        value = tuple(value)
        object.__setattr__(self, f.name, value)
      if not f.metadata["ok"](value):
        raise ConfigError(f"Invalid {self.key(f.name)} = {value!r}: must be "
                          f"{f.metadata['allowed']}.")
    self.check()

  def check(self):
    """Rules that involve several knobs of the section."""

  @classmethod
  def key(cls, name: str) -> str:
    return f"config.{cls.NAME}.{name}" if cls.NAME else f"config.{name}"

  @classmethod
  def from_section(cls, values: dict[str, Any]):
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
      raise ConfigError(f"Unknown key(s) {[cls.key(k) for k in unknown]}; "
                        f"{cls.key('')[:-1]} takes {sorted(known)}.")
    return cls(**values)
