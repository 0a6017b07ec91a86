"""Monthly budgets: the file, which budget applies, and when budget_burn fires."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from gpuledger.ledger.budgets import (
    Budget,
    BudgetError,
    SpendRow,
    budgets_for_month,
    decide,
    month_bounds,
    parse_budgets,
    projected_usd,
    spend_of,
)
from gpuledger.ledger.idle import AlertEvent, AlertKey
from gpuledger.schema.messages import AlertKind, AlertState


def at(month: int, day: int, hour: int = 0, year: int = 2026) -> float:
    return datetime(year, month, day, hour, tzinfo=UTC).timestamp()


JAN_BUDGET = Budget("2026-01", "research", "", 1000.0)


def spend(mtd: float, last_hour: float = 0.0, team: str = "research") -> list[SpendRow]:
    return [SpendRow(team, "llm", mtd, last_hour), SpendRow("other", "llm", 5000.0, 500.0)]


def apply(firing: dict[AlertKey, AlertEvent], events: list[AlertEvent]) -> None:
    for e in events:
        if e.alert.state is AlertState.firing:
            firing[e.key] = e
        else:
            firing.pop(e.key, None)


def summary(events: list[AlertEvent]) -> list[tuple[str, str]]:
    return [(e.rule, e.alert.state.value) for e in events]


def test_a_budgets_file_lists_months_scopes_and_dollars() -> None:
    text = (
        "# January is tight\n"
        "month,team,project,budget_usd\n"
        "2026-01,research,,1000\n"
        "*,research,,5000\n"
        "2026-01,,llm-pretrain,2500.50\n"
        ",,,90000\n"
    )
    assert parse_budgets(text, "b.csv") == [
        Budget("2026-01", "research", "", 1000.0),
        Budget("*", "research", "", 5000.0),
        Budget("2026-01", "", "llm-pretrain", 2500.5),
        Budget("*", "", "", 90000.0),
    ]


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("team,budget_usd\nx,1\n", "b.csv: the header must be month,team,project,budget_usd"),
        ("month,team,project,budget_usd\n2026-13,a,,1\n", "b.csv line 2: month must be YYYY-MM"),
        (
            "month,team,project,budget_usd\n2026-01,a,,lots\n",
            "b.csv line 2: budget_usd must be a number of dollars, got 'lots'",
        ),
        ("month,team,project,budget_usd\n*,a,,-5\n", "b.csv line 2: budget_usd must be > 0"),
        (
            "month,team,project,budget_usd\n*,a,,5\n*,a,,6\n",
            "b.csv line 3: a second budget for month *, team 'a', project ''",
        ),
    ],
)
def test_a_bad_budgets_file_names_the_line_the_field_and_the_value(text: str, error: str) -> None:
    with pytest.raises(BudgetError) as info:
        parse_budgets(text, "b.csv")
    assert error in str(info.value)


def test_a_months_own_budget_beats_the_every_month_one() -> None:
    budgets = [
        Budget("*", "research", "", 5000.0),
        Budget("2026-01", "research", "", 1000.0),
        Budget("*", "vision", "", 300.0),
        Budget("2026-02", "vision", "", 900.0),
    ]
    assert sorted(budgets_for_month(budgets, "2026-01"), key=lambda b: b.team) == [
        Budget("2026-01", "research", "", 1000.0),
        Budget("*", "vision", "", 300.0),
    ]


def test_a_budget_covers_the_spend_its_team_and_project_match() -> None:
    rows = [
        SpendRow("research", "llm", 10.0, 1.0),
        SpendRow("research", "eval", 5.0, 0.5),
        SpendRow("vision", "llm", 7.0, 0.7),
        SpendRow("", "", 3.0, 0.3),  # unallocated GPUs
    ]
    assert spend_of(Budget("*", "research", "", 1), rows) == (15.0, 1.5)
    assert spend_of(Budget("*", "", "llm", 1), rows) == (17.0, pytest.approx(1.7))
    assert spend_of(Budget("*", "research", "llm", 1), rows) == (10.0, 1.0)
    assert spend_of(Budget("*", "", "", 1), rows) == (25.0, pytest.approx(2.5))


def test_months_start_and_end_in_utc() -> None:
    assert month_bounds(at(12, 31, 23, year=2025)) == (at(12, 1, year=2025), at(1, 1))
    assert month_bounds(at(2, 10, year=2028)) == (at(2, 1, year=2028), at(3, 1, year=2028))


def test_spend_alerts_fire_once_at_each_line_of_the_budget() -> None:
    """No spend in the last hour: only the month-to-date lines (and, once over, the burn)."""
    firing: dict[AlertKey, AlertEvent] = {}
    steps = [(400.0, []), (500.0, ["mtd_50"]), (700.0, []), (850.0, ["mtd_80"]),
             (1200.0, ["mtd_100", "burn_rate"]), (1300.0, [])]  # fmt: skip
    for mtd, fired in steps:
        events = decide([JAN_BUDGET], spend(mtd), at(1, 20), firing)
        assert summary(events) == [(rule, "firing") for rule in fired], mtd
        apply(firing, events)
    top = firing[("budget_burn", "mtd_100", "", "", "research", "")].alert
    assert top.kind is AlertKind.budget_burn and top.since == at(1, 1)
    assert top.wasted_usd == 200.0  # dollars over the budget when it fired
    assert top.message == (
        "team research: $1,200.00 spent in 2026-01, 120% of its $1,000.00 budget (crossed 100%)"
    )


def test_the_last_hours_burn_rate_projected_to_the_months_end_raises_an_alert() -> None:
    now = at(1, 21)  # 11 days = 264 hours left in January
    assert projected_usd(100.0, 4.0, now) == 100.0 + 4.0 * 264
    firing: dict[AlertKey, AlertEvent] = {}
    events = decide([JAN_BUDGET], spend(100.0, last_hour=4.0), now, firing)
    assert summary(events) == [("burn_rate", "firing")]
    assert "burning $4.00/h over the last hour; at that rate 2026-01 ends at $1,156.00" in (
        events[0].alert.message
    )
    apply(firing, events)
    # A bit lower but above 95 %: it stays (no flapping); well under: it resolves.
    assert decide([JAN_BUDGET], spend(100.0, last_hour=3.5), now, firing) == []
    events = decide([JAN_BUDGET], spend(100.0, last_hour=2.0), now, firing)
    assert summary(events) == [("burn_rate", "resolved")]
    assert events[0].alert.ts == now


def test_a_new_month_resolves_last_months_alerts() -> None:
    firing: dict[AlertKey, AlertEvent] = {}
    apply(firing, decide([JAN_BUDGET], spend(900.0), at(1, 30), firing))
    assert sorted(k[1] for k in firing) == ["mtd_50", "mtd_80"]
    february = [Budget("*", "research", "", 5000.0)]
    events = decide(february, spend(10.0), at(2, 1, 2), firing)
    assert sorted(summary(events)) == [("mtd_50", "resolved"), ("mtd_80", "resolved")]
    assert {e.alert.ts for e in events} == {at(2, 1)}


def test_spend_back_under_a_line_or_a_removed_budget_resolves_its_alert() -> None:
    firing: dict[AlertKey, AlertEvent] = {}
    apply(firing, decide([JAN_BUDGET], spend(600.0), at(1, 10), firing))
    raised = Budget("2026-01", "research", "", 2000.0)
    assert summary(decide([raised], spend(600.0), at(1, 10, 1), firing)) == [("mtd_50", "resolved")]
    gone = decide([], spend(600.0), at(1, 10, 1), firing)
    assert summary(gone) == [("mtd_50", "resolved")]
    assert "removed" in gone[0].alert.message
