"""Small helpers for the analysts' parameterized SQL."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from gpuledger.analysts.window import Window, as_utc


def ch_time(when: datetime) -> str:
    """A UTC time as ClickHouse's DateTime64(3) text, whatever the client's time zone."""
    return as_utc(when).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


def window_params(window: Window) -> dict[str, str]:
    """Bind values for `{start:DateTime64(3, 'UTC')}` and `{end:DateTime64(3, 'UTC')}`."""
    return {"start": ch_time(window.start), "end": ch_time(window.end)}


WINDOW_ARGS = "start = {start:DateTime64(3, 'UTC')}, end = {end:DateTime64(3, 'UTC')}"


def rows_as_dicts(result: Any) -> list[dict[str, Any]]:
    names = list(result.column_names)
    return [dict(zip(names, row, strict=True)) for row in result.result_rows]
