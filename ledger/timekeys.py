"""Times as the store keeps them: whole milliseconds (DateTime64(3) columns).

Every identity that includes a time (a sample's, a usage event's, an alert row's) is taken
in these milliseconds, so that what the worker holds in memory matches what it reads back.
"""

from __future__ import annotations


def to_ms(ts: float) -> int:
    """Epoch seconds -> whole epoch milliseconds, rounded as the store rounds them."""
    return round(ts * 1000)


def sample_key(gpu_uuid: str, ts: float) -> tuple[str, int]:
    """The identity of a sample: its GPU and its start in whole milliseconds (as stored)."""
    return gpu_uuid, round(ts * 1000)
