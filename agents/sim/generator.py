"""Deterministic noise: numbers that look random but are fixed by their key and index.

The engine draws every fluctuation (utilization, power, requests) from here, so the same
scenario, seed and time always give the same values, which tests and replays rely on.
"""

from __future__ import annotations

import hashlib

_MASK = (1 << 64) - 1


def _splitmix(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


def mix_key(*parts: object) -> int:
    """A 64-bit key that names a stream of numbers (a job, a GPU, a seed)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def uniform(key: int, n: int) -> float:
    """A uniform number in [0, 1) fixed by (key, n)."""
    return _splitmix(key ^ _splitmix(n & _MASK)) / 18446744073709551616.0


def clamp(x: float, lo: float = 0.0, hi: float = 1.0) -> float:
    return lo if x < lo else hi if x > hi else x
