"""Time windows of the analysts' commands: `--from/--to`, or `--period 7d` ending `--end`."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

_PERIOD = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([mhdw])\s*$", re.IGNORECASE)
_UNIT_SECONDS = {"m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
DAYS_PER_MONTH = 30.0


class WindowError(ValueError):
    """A window option that cannot be understood; the message says what to write instead."""


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


def parse_period(text: str) -> timedelta:
    """`30m`, `12h`, `7d`, `2w` as a timedelta."""
    match = _PERIOD.match(text)
    if match is None:
        raise WindowError(
            f"period {text!r} is not a number and a unit; write e.g. 12h, 7d or 2w "
            "(m = minutes, h = hours, d = days, w = weeks)"
        )
    amount = float(match.group(1))
    if amount <= 0:
        raise WindowError(f"period {text!r} must be longer than zero")
    return timedelta(seconds=amount * _UNIT_SECONDS[match.group(2).lower()])


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
