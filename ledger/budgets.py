"""Monthly GPU budgets per team or project, in USD, and the `budget_burn` alerts they raise.

A budget covers the spend (Σ `cost_usd * sign`) of the facts whose team and project match
its own, an empty team or project matching any: `team=research` alone is the team's whole
spend, `project=llm-pretrain` alone the project's whatever the team, both empty the whole
fleet (unallocated GPUs included). Per budget and month, four rules:

- `mtd_50`, `mtd_80`, `mtd_100`: month-to-date spend reached that share of the budget;
  `since` is the month's start. They stay firing until the month ends, or until the spend
  falls back under the line (a correction, a raised budget).
- `burn_rate`: the last hour's spend, extrapolated to the month's end, exceeds the budget:
  month-to-date + last hour * hours left > budget. It resolves once the projection is back
  under 95 % of the budget (hysteresis), or when the month ends.

Time is event time: "now" is the newest fact's time, so a replayed month raises the alerts a
live one did (at the evaluation times, every `budget_check_s` of wall time, which are not
the crossing moments: budgets are coarse). Spend is read from the store's hour and minute
rollups, which include the corrections of late metadata. A restarted worker reads what is
firing from the `alerts` table and goes on from there.

The decisions (`parse_budgets`, `budgets_for_month`, `spend_of`, `decide`) are pure; the store
access and the observer that runs them in the worker are `gpuledger.streams.budgets`.
"""

from __future__ import annotations

import calendar
import csv
import io
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from gpuledger.ledger.idle import AlertEvent, AlertKey
from gpuledger.schema.messages import Alert, AlertKind, AlertState

ANY_MONTH = "*"
LEVELS: tuple[tuple[float, str], ...] = ((0.5, "mtd_50"), (0.8, "mtd_80"), (1.0, "mtd_100"))
BURN_RATE = "burn_rate"
BURN_RESOLVE_FRACTION = 0.95
SEVERITY = {"mtd_50": "info", "mtd_80": "warning", "mtd_100": "critical", BURN_RATE: "warning"}
_MONTH = re.compile(r"^\d{4}-(0[1-9]|1[0-2])$")
COLUMNS = ("month", "team", "project", "budget_usd")


@dataclass(frozen=True, slots=True)
class Budget:
    month: str
    """'YYYY-MM', or '*' for every month without a row of its own."""
    team: str
    project: str
    budget_usd: float

    @property
    def scope(self) -> str:
        parts = [f"team {self.team}"] if self.team else []
        parts += [f"project {self.project}"] if self.project else []
        return " / ".join(parts) or "the whole fleet"


class BudgetError(ValueError):
    """A budgets file is not valid; the message names the line, the field and the value."""


# --- the budgets file -------------------------------------------------------------------


def parse_budgets(text: str, source: str = "budgets") -> list[Budget]:
    """CSV with the header `month,team,project,budget_usd` (`#` lines are comments)."""
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    reader = csv.DictReader(io.StringIO("\n".join(lines)))
    header = [h.strip() for h in reader.fieldnames or []]
    if set(header) != set(COLUMNS):
        raise BudgetError(
            f"{source}: the header must be {','.join(COLUMNS)}, got {','.join(header) or '(none)'}"
        )
    budgets: list[Budget] = []
    seen: dict[tuple[str, str, str], int] = {}
    for number, raw in enumerate(reader, start=2):
        row = {k.strip(): (v or "").strip() for k, v in raw.items() if k is not None}
        where = f"{source} line {number}"
        month = row["month"] or ANY_MONTH
        if month != ANY_MONTH and not _MONTH.match(month):
            raise BudgetError(f"{where}: month must be YYYY-MM or *, got {row['month']!r}")
        try:
            usd = float(row["budget_usd"])
        except ValueError:
            raise BudgetError(
                f"{where}: budget_usd must be a number of dollars, got {row['budget_usd']!r}"
            ) from None
        if not math.isfinite(usd) or usd <= 0:
            raise BudgetError(f"{where}: budget_usd must be > 0, got {row['budget_usd']!r}")
        key = (month, row["team"], row["project"])
        if key in seen:
            raise BudgetError(
                f"{where}: a second budget for month {month}, team {row['team']!r}, project "
                f"{row['project']!r} (the first is on line {seen[key]}); keep one"
            )
        seen[key] = number
        budgets.append(Budget(month, row["team"], row["project"], usd))
    return budgets


def load_budgets(path: Path) -> list[Budget]:
    try:
        text = path.read_text()
    except OSError as exc:
        raise BudgetError(f"budgets file {path}: cannot read it ({exc})") from exc
    return parse_budgets(text, str(path))


# --- months -----------------------------------------------------------------------------


def month_of(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m")


def month_bounds(t: float) -> tuple[float, float]:
    """Start and end (epoch seconds, UTC) of the month that contains t."""
    day = datetime.fromtimestamp(t, UTC)
    start = datetime(day.year, day.month, 1, tzinfo=UTC)
    days = calendar.monthrange(day.year, day.month)[1]
    return start.timestamp(), start.timestamp() + days * 86400.0


def budgets_for_month(budgets: Iterable[Budget], month: str) -> list[Budget]:
    """The budgets in force in `month`: its own rows, else the '*' rows, per scope."""
    chosen: dict[tuple[str, str], Budget] = {}
    for budget in budgets:
        if budget.month not in (month, ANY_MONTH):
            continue
        key = (budget.team, budget.project)
        if key not in chosen or budget.month == month:
            chosen[key] = budget
    return list(chosen.values())


# --- decisions --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SpendRow:
    """Spend of one (team, project) pair: month to date, and in the hour before now."""

    team: str
    project: str
    month_to_date_usd: float
    last_hour_usd: float


def spend_of(budget: Budget, rows: Iterable[SpendRow]) -> tuple[float, float]:
    """(month-to-date, last hour) dollars of the facts a budget covers."""
    mtd = hour = 0.0
    for row in rows:
        if (not budget.team or row.team == budget.team) and (
            not budget.project or row.project == budget.project
        ):
            mtd += row.month_to_date_usd
            hour += row.last_hour_usd
    return mtd, hour


def projected_usd(month_to_date: float, last_hour: float, as_of: float) -> float:
    """What the month ends at if the last hour's rate goes on."""
    _, month_end = month_bounds(as_of)
    return month_to_date + last_hour * max(month_end - as_of, 0.0) / 3600.0


def budget_key(rule: str, team: str, project: str) -> AlertKey:
    return (AlertKind.budget_burn.value, rule, "", "", team, project)


def _event(
    budget: Budget,
    rule: str,
    state: AlertState,
    *,
    ts: float,
    since: float,
    over_usd: float,
    message: str,
    fired_at: float,
) -> AlertEvent:
    alert = Alert(
        ts=ts,
        kind=AlertKind.budget_burn,
        state=state,
        team=budget.team,
        project=budget.project,
        since=since,
        wasted_usd=max(over_usd, 0.0),
        message=message,
        rule=rule,
    )
    return AlertEvent(alert, fired_at=fired_at)


def _resolve(previous: AlertEvent, ts: float, why: str) -> AlertEvent:
    old = previous.alert
    alert = old.model_copy(
        update={"ts": max(ts, old.ts), "state": AlertState.resolved, "message": why}
    )
    return AlertEvent(alert, fired_at=previous.fired_at)


def decide(
    budgets: Sequence[Budget],
    spend: Sequence[SpendRow],
    as_of: float,
    firing: Mapping[AlertKey, AlertEvent],
) -> list[AlertEvent]:
    """The budget alerts to emit at event time `as_of`, given what is firing now.

    `budgets` are those in force this month (`budgets_for_month`); `firing` holds the
    budget alerts whose latest row is firing, by key.
    """
    check = _Check(as_of, firing)
    for budget in budgets:
        mtd, last_hour = spend_of(budget, spend)
        check.levels(budget, mtd)
        check.burn_rate(budget, mtd, last_hour)
    for key, event in firing.items():
        if key not in check.keep and event.alert.since >= check.month_start:
            check.out.append(_resolve(event, as_of, "the budget was removed or changed scope"))
    return check.out


class _Check:
    """One evaluation of the budgets at `as_of`: the alerts it emits (`out`, in order) and
    the keys whose alert it has decided on (`keep`)."""

    def __init__(self, as_of: float, firing: Mapping[AlertKey, AlertEvent]) -> None:
        self.as_of = as_of
        self.firing = firing
        self.month_start, _ = month_bounds(as_of)
        self.month = month_of(as_of)
        self.out: list[AlertEvent] = []
        self.keep: set[AlertKey] = set()

    def current(self, key: AlertKey) -> AlertEvent | None:
        event = self.firing.get(key)
        if event is not None and event.alert.since < self.month_start:
            # Last month's alert: it ended with its month.
            reason = f"{month_of(event.alert.since)} is over"
            self.out.append(_resolve(event, self.month_start, reason))
            return None
        return event

    def levels(self, budget: Budget, mtd: float) -> None:
        """Fire a level's alert once the month's spend crosses it; resolve it under it."""
        pct = mtd / budget.budget_usd * 100
        for level, rule in LEVELS:
            key = budget_key(rule, budget.team, budget.project)
            now = self.current(key)
            if mtd >= level * budget.budget_usd:
                self.keep.add(key)
                if now is None:
                    message = (
                        f"{budget.scope}: ${mtd:,.2f} spent in {self.month}, {pct:.0f}% of its "
                        f"${budget.budget_usd:,.2f} budget (crossed {level:.0%})"
                    )
                    self.fire(budget, rule, self.month_start, mtd - budget.budget_usd, message)
            elif now is not None:
                self.keep.add(key)  # resolved here, with its own reason
                reason = (
                    f"{budget.scope}: ${mtd:,.2f} spent in {self.month}, back under "
                    f"{level:.0%} of its ${budget.budget_usd:,.2f} budget"
                )
                self.out.append(_resolve(now, self.as_of, reason))

    def burn_rate(self, budget: Budget, mtd: float, last_hour: float) -> None:
        """Fire when the last hour's rate ends the month over budget; resolve (with
        hysteresis) once it ends the month well under."""
        key = budget_key(BURN_RATE, budget.team, budget.project)
        now = self.current(key)
        projected = projected_usd(mtd, last_hour, self.as_of)
        if projected > budget.budget_usd:
            self.keep.add(key)
            if now is None:
                message = (
                    f"{budget.scope}: burning ${last_hour:,.2f}/h over the last hour; at that "
                    f"rate {self.month} ends at ${projected:,.2f}, over its "
                    f"${budget.budget_usd:,.2f} budget (${mtd:,.2f} spent so far)"
                )
                self.fire(budget, BURN_RATE, self.as_of, projected - budget.budget_usd, message)
        elif now is not None:
            self.keep.add(key)
            if projected < BURN_RESOLVE_FRACTION * budget.budget_usd:
                reason = (
                    f"{budget.scope}: the burn rate came down: {self.month} now ends at "
                    f"${projected:,.2f} of its ${budget.budget_usd:,.2f} budget"
                )
                self.out.append(_resolve(now, self.as_of, reason))

    def fire(self, budget: Budget, rule: str, since: float, over_usd: float, message: str) -> None:
        self.out.append(
            _event(
                budget,
                rule,
                AlertState.firing,
                ts=self.as_of,
                since=since,
                over_usd=over_usd,
                message=message,
                fired_at=self.as_of,
            )
        )
