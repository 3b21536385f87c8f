"""Named seed streams: one integer seed per (run seed, role, indices), no seed arithmetic.

`stream(seed, "probe", r)` is a pure function of its arguments; two roles never
share a stream (the role's name is hashed into the seed sequence), unlike
offsets such as ``seed * 1009 + r`` that can collide across roles.
"""

from __future__ import annotations

import zlib

import numpy as np


def stream(seed: int, role: str, *index: int) -> int:
  """A 31-bit seed for `role` (e.g. "probe", "spurious") at `index` (e.g. the round)."""
  entropy = [int(seed), zlib.crc32(role.encode("utf-8")), *(int(i) for i in index)]
  return int(np.random.SeedSequence(entropy).generate_state(1)[0] & 0x7FFFFFFF)


def rng(seed: int, role: str, *index: int) -> np.random.Generator:
  """A numpy Generator on `stream(seed, role, *index)`."""
  return np.random.default_rng(stream(seed, role, *index))
