"""Times as the store keeps them: whole milliseconds (DateTime64(3) columns).

Every identity that includes a time (a sample's, a usage event's, an alert row's) is taken
in these milliseconds, so that what the worker holds in memory matches what it reads back.
"""

from __future__ import annotations

from datetime import UTC, datetime


def to_ms(ts: float) -> int:
    """Epoch seconds -> whole epoch milliseconds, rounded as the store rounds them."""
    return round(ts * 1000)


def sample_key(gpu_uuid: str, ts: float) -> tuple[str, int]:
    """The identity of a sample: its GPU and its start in whole milliseconds (as stored)."""
    return gpu_uuid, round(ts * 1000)


def iso_utc(ts: float, timespec: str = "seconds") -> str:
    """Epoch seconds as ISO 8601 in UTC with a `Z`: `2026-03-04T11:00:00Z` (or to the
    millisecond, as Alertmanager's times are written)."""
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec=timespec).replace("+00:00", "Z")
