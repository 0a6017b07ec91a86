"""The analysts' time windows: `--from/--to`, or a period ending at a time."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from gpuledger.analysts.window import FactSpan, WindowError, data_now, parse_period, resolve_window


def test_a_period_ends_at_to_and_a_month_is_thirty_days() -> None:
    window = resolve_window(period="7d", end="2026-11-09")
    assert (window.start, window.end) == (
        datetime(2026, 11, 2, tzinfo=UTC),
        datetime(2026, 11, 9, tzinfo=UTC),
    )
    assert window.to_month == pytest.approx(30 / 7)
    assert window.label() == "2026-11-02 to 2026-11-09"


def test_from_and_to_take_dates_times_and_epoch_seconds() -> None:
    window = resolve_window(start="2026-11-02T06:00:00Z", end="1793664000")
    assert window.start == datetime(2026, 11, 2, 6, tzinfo=UTC)
    assert window.end == datetime(2026, 11, 3, tzinfo=UTC)
    assert window.hours == 18


@pytest.mark.parametrize(
    ("options", "says"),
    [
        ({"period": "7 days"}, "write e.g. 30min, 12h, 7d, 2w or 1mo"),
        ({"period": "1m"}, "ambiguous: write 1min for minutes or 1mo for months"),
        ({"start": "2026-11-09", "end": "2026-11-02"}, "swap --from and --to"),
        ({"start": "last tuesday", "end": "2026-11-02"}, "--from 'last tuesday' is neither"),
        ({}, "give the window"),
    ],
)
def test_a_window_that_cannot_be_understood_says_what_to_write(
    options: dict[str, str], says: str
) -> None:
    with pytest.raises(WindowError, match=says):
        resolve_window(
            start=options.get("start"), end=options.get("end"), period=options.get("period")
        )


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90s", 90), ("30min", 1800), ("12h", 43200), ("7d", 604800), ("2w", 1209600),
     ("1mo", 30 * 86400), ("1.5h", 5400)],
)  # fmt: skip
def test_periods_take_units_no_one_misreads(text: str, seconds: int) -> None:
    assert parse_period(text).total_seconds() == seconds


def test_now_is_the_newest_facts_end_never_after_the_wall_clock() -> None:
    clock = datetime(2026, 12, 4, tzinfo=UTC)
    old = FactSpan(datetime(2026, 11, 2, tzinfo=UTC), datetime(2026, 11, 3, tzinfo=UTC))
    assert data_now(old, clock) == datetime(2026, 11, 3, tzinfo=UTC)
    future = FactSpan(datetime(2026, 11, 2, tzinfo=UTC), datetime(2027, 1, 1, tzinfo=UTC))
    assert data_now(future, clock) == clock
    assert data_now(None, clock) == clock
