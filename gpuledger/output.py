"""Values as the command line prints them: strict JSON, times with their zone, no float noise.

A float is printed with at most 15 significant digits, the precision a Float64 sum keeps:
`1.375000000000001` (a sum's rounding) prints as `1.375`. NaN and infinities are `null` in
JSON and empty in CSV (strict parsers reject `NaN`); times are ISO 8601 in UTC with `Z`.
"""

from __future__ import annotations

import math
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any
from uuid import UUID


def clean_float(value: float) -> float | None:
    """The float without the noise of its last bits; None where it is not finite."""
    if not math.isfinite(value):
        return None
    return float(f"{value:.15g}")


def iso_time(value: datetime) -> str:
    """`2026-11-02T00:40:00Z`; a naive time is the store's, which is UTC."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    text = value.astimezone(UTC).isoformat()
    return text.removesuffix("+00:00") + "Z"


def json_value(value: Any) -> Any:
    """A value a strict JSON encoder takes as is."""
    if isinstance(value, bool) or value is None or isinstance(value, int | str):
        return value
    if isinstance(value, float):
        return clean_float(value)
    if isinstance(value, Decimal):
        return clean_float(float(value)) if value.is_finite() else None
    if isinstance(value, datetime):
        return iso_time(value)
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, UUID | bytes):
        return value.hex() if isinstance(value, bytes) else str(value)
    if isinstance(value, dict):
        return {str(k): json_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [json_value(v) for v in value]
    return str(value)


def text_value(value: Any, null: str = "") -> str:
    """A value in a CSV cell or a table cell (`null` for NULL, NaN and infinities)."""
    if value is None:
        return null
    if isinstance(value, float):
        cleaned = clean_float(value)
        return null if cleaned is None else repr(cleaned)
    if isinstance(value, datetime):
        return iso_time(value)
    if isinstance(value, dict | list | tuple):
        import json

        return json.dumps(json_value(value), ensure_ascii=False)
    return str(value)


def print_json(records: Any) -> None:
    """Strict JSON on standard output (see `json_value`)."""
    import json

    print(json.dumps(json_value(records), indent=1, ensure_ascii=False, allow_nan=False))


def print_csv(names: list[str], rows: Any) -> None:
    """CSV on standard output: the header always, even with no row."""
    import csv
    import sys

    writer = csv.writer(sys.stdout)
    writer.writerow(names)
    writer.writerows([text_value(v) for v in row] for row in rows)


def plural(count: int, word: str, words: str | None = None) -> str:
    """`1 alert`, `2 alerts`, `0 alerts`."""
    return f"{count:,} {word if count == 1 else (words or word + 's')}"


def money(usd: float | None) -> str:
    """Dollars, one way everywhere: `$1,234.56`; under a cent (a short demo) `$0.0042`;
    `—` when unknown."""
    if usd is None or not math.isfinite(usd):
        return "—"
    if 0 < abs(usd) < 0.01:
        return f"${usd:.4f}"
    return f"${usd:,.2f}"
