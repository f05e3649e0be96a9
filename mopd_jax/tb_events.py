"""TensorBoard event files of scalars, written without TensorFlow or tensorboardX.

An event file is a sequence of records (the TFRecord framing: little-endian uint64
length, masked CRC-32C of the length, the bytes, masked CRC-32C of the bytes), each an
`Event` protocol buffer: first one with `file_version = "brain.Event:2"`, then one per
step whose `Summary` holds the step's scalars as `simple_value`s. Only the few fields
needed are encoded, by hand:

    Event:   wall_time = 1 (double), step = 2 (int64), file_version = 3 (string),
             summary = 5 (Summary)
    Summary: value = 1 (repeated Value)
    Value:   tag = 1 (string), simple_value = 2 (float)

Why not tensorboardX: it imports torch when torch is installed (about 1.5 s of every
run's start-up, and of every training process a test starts), for scalars that take
these few lines. `tests/test_metrics.py` reads the files back with TensorFlow's reader.
"""

from __future__ import annotations

import os
import socket
import struct
import time


def _crc32c_table() -> list[int]:
  table = []
  for byte in range(256):
    crc = byte
    for _ in range(8):
      crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)  # Castagnoli, reflected
    table.append(crc)
  return table


_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
  crc = 0xFFFFFFFF
  for byte in data:
    crc = _TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
  crc = crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def record(data: bytes) -> bytes:
  """`data` in the TFRecord framing."""
  length = struct.pack("<Q", len(data))
  return (length + struct.pack("<I", _masked_crc(length)) + data
          + struct.pack("<I", _masked_crc(data)))


def _varint(n: int) -> bytes:
  n &= (1 << 64) - 1  # int64 as protocol buffers write it (negative: ten bytes)
  out = bytearray()
  while True:
    low, n = n & 0x7F, n >> 7
    out.append(low | (0x80 if n else 0))
    if not n:
      return bytes(out)


def _bytes_field(number: int, payload: bytes) -> bytes:
  return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def event(wall_time: float, step: int, *, file_version: str | None = None,
          scalars: dict[str, float] | None = None) -> bytes:
  """One serialised `Event`."""
  out = _varint(1 << 3 | 1) + struct.pack("<d", wall_time) + _varint(2 << 3) + _varint(step)
  if file_version is not None:
    out += _bytes_field(3, file_version.encode())
  if scalars:
    summary = b"".join(
        _bytes_field(1, _bytes_field(1, tag.encode()) + _varint(2 << 3 | 5)
                     + struct.pack("<f", value))
        for tag, value in scalars.items())
    out += _bytes_field(5, summary)
  return out


class EventWriter:
  """Appends one event of scalars per step to a new event file in `logdir`."""

  def __init__(self, logdir: str):
    os.makedirs(logdir, exist_ok=True)
    name = (f"events.out.tfevents.{time.time():.6f}.{socket.gethostname()}."
            f"{os.getpid()}")
    self.path = os.path.join(logdir, name)
    self._file = open(self.path, "ab")
    self._file.write(record(event(time.time(), 0, file_version="brain.Event:2")))
    self._file.flush()

  def scalars(self, step: int, values: dict[str, float]):
    self._file.write(record(event(time.time(), step, scalars=values)))

  def flush(self):
    self._file.flush()

  def close(self):
    self._file.close()
