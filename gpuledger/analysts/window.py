"""Time windows of the commands that read a period: `--from/--to`, or `--period 7d` ending `--to`.

One rule for "now" in every command (`report`, `recommend`, `export focus`, `alerts --since`,
`budgets show`): now is the end of the newest cost fact in the store (event time), never
later than the wall clock; the wall clock when the store holds no fact. A replayed month or a
backfill is then found by the default windows, and a live fleet's newest fact is a second old.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

_PERIOD = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-z]+)\s*$", re.IGNORECASE)
DAYS_PER_MONTH = 30.0
_UNIT_SECONDS = {
    "s": 1,
    "min": 60,
    "h": 3600,
    "d": 86400,
    "w": 7 * 86400,
    "mo": DAYS_PER_MONTH * 86400,
}
PERIOD_UNITS = "s, min, h, d, w, mo (30 days)"


@dataclass(frozen=True)
class Window:
    """The half-open UTC interval [start, end)."""

    start: datetime
    end: datetime

    def __post_init__(self) -> None:
        if self.end <= self.start:
            raise WindowError(
                f"window end {self.end.isoformat()} must be after its start "
                f"{self.start.isoformat()}; swap --from and --to"
            )

    @property
    def seconds(self) -> float:
        return (self.end - self.start).total_seconds()

    @property
    def hours(self) -> float:
        return self.seconds / 3600.0

    @property
    def days(self) -> float:
        return self.seconds / 86400.0

    @property
    def to_month(self) -> float:
        """The factor that turns a figure of this window into one of 30 days."""
        return DAYS_PER_MONTH / self.days

    def label(self) -> str:
        return f"{_short(self.start)} to {_short(self.end)}"


def _short(when: datetime) -> str:
    if when.hour == when.minute == when.second == 0:
        return when.strftime("%Y-%m-%d")
    return when.strftime("%Y-%m-%d %H:%M UTC")


class WindowError(ValueError):
    """A window option that cannot be understood; the message says what to write instead."""


def parse_period(text: str) -> timedelta:
    """`90s`, `30min`, `12h`, `7d`, `2w`, `1mo` (30 days) as a timedelta. `m` is refused:
    half the world reads it as minutes, the other half as months."""
    match = _PERIOD.match(text)
    unit = match.group(2).lower() if match else ""
    if match and unit == "m":
        raise WindowError(
            f"period {text!r} is ambiguous: write {match.group(1)}min for minutes "
            f"or {match.group(1)}mo for months"
        )
    if match is None or unit not in _UNIT_SECONDS:
        raise WindowError(
            f"period {text!r} is not a number and a unit; write e.g. 30min, 12h, 7d, 2w or 1mo "
            f"(units: {PERIOD_UNITS})"
        )
    amount = float(match.group(1))
    if amount <= 0:
        raise WindowError(f"period {text!r} must be longer than zero")
    return timedelta(seconds=amount * _UNIT_SECONDS[unit])


def parse_time(text: str, option: str = "time") -> datetime:
    """Epoch seconds, an ISO date (`2026-11-02`, midnight UTC) or an ISO time, as UTC."""
    try:
        return datetime.fromtimestamp(float(text), UTC)
    except ValueError:
        pass
    try:
        parsed = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise WindowError(
            f"{option} {text!r} is neither epoch seconds nor an ISO 8601 date or time; "
            "write e.g. 2026-11-02 or 2026-11-02T10:00:00Z"
        ) from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.astimezone(UTC)


def resolve_window(
    *,
    start: str | None = None,
    end: str | None = None,
    period: str | None = None,
    now: datetime | None = None,
) -> Window:
    """The window from the options: both bounds, or a period ending at `end` (default now),
    or a period starting at `start`."""
    end_at = parse_time(end, "--to") if end else None
    start_at = parse_time(start, "--from") if start else None
    if start_at is not None and end_at is not None:
        if period:
            raise WindowError("give --from and --to, or --period with one of them, not all three")
        return Window(start_at, end_at)
    if not period:
        raise WindowError("give the window: --from and --to, or --period (e.g. 7d)")
    length = parse_period(period)
    if start_at is not None:
        return Window(start_at, start_at + length)
    finish = end_at or (now or datetime.now(UTC))
    return Window(finish - length, finish)


def as_utc(value: datetime) -> datetime:
    """ClickHouse's DateTime64(3, 'UTC') arrives naive from clickhouse-connect: it is UTC."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


@dataclass(frozen=True)
class FactSpan:
    """The event times the store's cost facts cover."""

    first: datetime
    end: datetime

    def describe(self) -> str:
        return f"the store holds facts from {_exact(self.first)} to {_exact(self.end)}"


def fact_span(client: Any) -> FactSpan | None:
    """From the oldest fact's start to the newest fact's end; None when there is none."""
    result = client.query(
        """SELECT toUnixTimestamp64Milli(min(ts)) / 1000,
                  toUnixTimestamp64Milli(max(ts)) / 1000, argMax(duration_s, ts), count()
           FROM gpuledger.cost_facts"""
    )
    first, last, duration, count = result.result_rows[0]
    if not count:
        return None
    end = float(last) + float(duration)
    return FactSpan(datetime.fromtimestamp(float(first), UTC), datetime.fromtimestamp(end, UTC))


def data_now(span: FactSpan | None, wall_clock: datetime | None = None) -> datetime:
    """ "Now" for every command: the newest fact's end, no later than the wall clock."""
    clock = wall_clock or datetime.now(UTC)
    return clock if span is None else min(span.end, clock)


def _exact(when: datetime) -> str:
    return when.strftime("%Y-%m-%d %H:%M:%S UTC")
