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

Pure decisions first (`parse_budgets`, `budgets_for_month`, `spend_of`, `decide`), then the
store access and the observer that runs them in the worker.
"""

from __future__ import annotations

import asyncio
import calendar
import contextlib
import csv
import io
import logging
import math
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gpuledger.schema.messages import Alert, AlertKind, AlertState
from gpuledger.streams.idle import AlertEvent, AlertKey

if TYPE_CHECKING:
    from gpuledger.schema.messages import CostFact
    from gpuledger.settings import Settings
    from gpuledger.streams.cost import JobRecord
    from gpuledger.streams.pipeline import CostPipeline

log = logging.getLogger("gpuledger.budgets")

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
    month_start, _ = month_bounds(as_of)
    month = month_of(as_of)
    out: list[AlertEvent] = []
    keep: set[AlertKey] = set()

    def current(key: AlertKey) -> AlertEvent | None:
        event = firing.get(key)
        if event is not None and event.alert.since < month_start:
            # Last month's alert: it ended with its month.
            out.append(_resolve(event, month_start, f"{month_of(event.alert.since)} is over"))
            return None
        return event

    for budget in budgets:
        mtd, last_hour = spend_of(budget, spend)
        pct = mtd / budget.budget_usd * 100
        for level, rule in LEVELS:
            key = budget_key(rule, budget.team, budget.project)
            now = current(key)
            if mtd >= level * budget.budget_usd:
                keep.add(key)
                if now is None:
                    message = (
                        f"{budget.scope}: ${mtd:,.2f} spent in {month}, {pct:.0f}% of its "
                        f"${budget.budget_usd:,.2f} budget (crossed {level:.0%})"
                    )
                    out.append(
                        _event(
                            budget,
                            rule,
                            AlertState.firing,
                            ts=as_of,
                            since=month_start,
                            over_usd=mtd - budget.budget_usd,
                            message=message,
                            fired_at=as_of,
                        )
                    )
            elif now is not None:
                keep.add(key)  # resolved below, with its own reason
                out.append(
                    _resolve(
                        now,
                        as_of,
                        f"{budget.scope}: ${mtd:,.2f} spent in {month}, back under {level:.0%} "
                        f"of its ${budget.budget_usd:,.2f} budget",
                    )
                )

        key = budget_key(BURN_RATE, budget.team, budget.project)
        now = current(key)
        projected = projected_usd(mtd, last_hour, as_of)
        if projected > budget.budget_usd:
            keep.add(key)
            if now is None:
                message = (
                    f"{budget.scope}: burning ${last_hour:,.2f}/h over the last hour; at that "
                    f"rate {month} ends at ${projected:,.2f}, over its "
                    f"${budget.budget_usd:,.2f} budget (${mtd:,.2f} spent so far)"
                )
                out.append(
                    _event(
                        budget,
                        BURN_RATE,
                        AlertState.firing,
                        ts=as_of,
                        since=as_of,
                        over_usd=projected - budget.budget_usd,
                        message=message,
                        fired_at=as_of,
                    )
                )
        elif now is not None:
            keep.add(key)
            if projected < BURN_RESOLVE_FRACTION * budget.budget_usd:
                out.append(
                    _resolve(
                        now,
                        as_of,
                        f"{budget.scope}: the burn rate came down: {month} now ends at "
                        f"${projected:,.2f} of its ${budget.budget_usd:,.2f} budget",
                    )
                )

    for key, event in firing.items():
        if key not in keep and event.alert.since >= month_start:
            out.append(_resolve(event, as_of, "the budget was removed or changed scope"))
    return out


# --- the store --------------------------------------------------------------------------


def store_budgets(
    client: Any, budgets: Sequence[Budget], *, source: str, replace: bool, now: float
) -> int:
    """Write budgets (the latest load of a scope and month wins). `replace`: also remove the
    active budgets the file does not list. Returns how many were removed."""
    loaded = {(b.month, b.team, b.project) for b in budgets}
    removed: list[list[Any]] = []
    if replace:
        for b in active_budgets(client):
            if (b.month, b.team, b.project) not in loaded:
                removed.append([b.month, b.team, b.project, b.budget_usd, 0, source])
    rows = [[b.month, b.team, b.project, b.budget_usd, 1, source] for b in budgets] + removed
    stamp = round(now * 1000)
    if rows:
        client.insert(
            "gpuledger.budgets",
            [[*row, stamp] for row in rows],
            column_names=[*COLUMNS, "active", "source", "loaded_at"],
        )
    return len(removed)


def active_budgets(client: Any) -> list[Budget]:
    result = client.query(
        """SELECT month, team, project, budget_usd FROM gpuledger.budgets FINAL
           WHERE active = 1 ORDER BY month, team, project"""
    )
    return [Budget(m, t, p, float(usd)) for m, t, p, usd in result.result_rows]


def latest_fact_time(client: Any) -> float | None:
    """The newest fact's end (event time), or None when there is none."""
    result = client.query(
        """SELECT toUnixTimestamp64Milli(max(ts)) / 1000, argMax(duration_s, ts), count()
           FROM gpuledger.cost_facts"""
    )
    ts, duration, count = result.result_rows[0]
    return None if not count else float(ts) + float(duration)


def spend_rows(client: Any, as_of: float) -> list[SpendRow]:
    """Spend per (team, project): this month up to `as_of`, and in the hour before it."""
    month_start, _ = month_bounds(as_of)
    params = {"start": round(month_start), "asof": round(as_of), "hour": round(as_of - 3600)}
    result = client.query(
        """SELECT team, project, sum(mtd), sum(last_hour) FROM (
               SELECT team, project, sum(cost_usd) AS mtd, 0 AS last_hour
               FROM gpuledger.cost_hour
               WHERE ts >= toDateTime({start:UInt32}, 'UTC')
                 AND ts < toDateTime({asof:UInt32}, 'UTC')
               GROUP BY team, project
               UNION ALL
               SELECT team, project, 0 AS mtd, sum(cost_usd) AS last_hour
               FROM gpuledger.cost_minute
               WHERE ts >= toDateTime({hour:UInt32}, 'UTC')
                 AND ts < toDateTime({asof:UInt32}, 'UTC')
               GROUP BY team, project)
           GROUP BY team, project""",
        parameters=params,
    )
    return [SpendRow(t, p, float(m), float(h)) for t, p, m, h in result.result_rows]


@dataclass(frozen=True, slots=True)
class BudgetStatus:
    budget: Budget
    month_to_date_usd: float
    last_hour_usd: float
    projected_usd: float

    @property
    def used(self) -> float:
        return self.month_to_date_usd / self.budget.budget_usd


def budget_status(
    client: Any, as_of: float | None = None
) -> tuple[float | None, list[BudgetStatus]]:
    """Every budget in force at `as_of` (default: the newest fact's time) with its spend."""
    as_of = as_of if as_of is not None else latest_fact_time(client)
    if as_of is None:
        return None, []
    budgets = budgets_for_month(active_budgets(client), month_of(as_of))
    rows = spend_rows(client, as_of)
    out = []
    for budget in budgets:
        mtd, hour = spend_of(budget, rows)
        out.append(BudgetStatus(budget, mtd, hour, projected_usd(mtd, hour, as_of)))
    return as_of, out


# --- the observer -----------------------------------------------------------------------


class BudgetObserver:
    """Evaluates the budgets every `budget_check_s` in a task of its own (never on the cost
    path) and hands the alerts it decides to `submit`. `load_firing(client)` reads the budget
    alerts firing in the store when the worker starts."""

    def __init__(
        self,
        settings: Settings,
        submit: Callable[[Sequence[AlertEvent]], None],
        load_firing: Callable[[Any], list[AlertEvent]],
    ) -> None:
        self.check_every_s = settings.budget_check_s
        self.submit = submit
        self.load_firing = load_firing
        self.watermark = -math.inf
        self.firing_now: dict[AlertKey, AlertEvent] = {}
        self._client: Any = None
        self._task: asyncio.Task[None] | None = None

    async def start(self, pipeline: CostPipeline) -> None:
        self._client = pipeline.sink.client
        firing = await asyncio.to_thread(self.load_firing, self._client)
        self.firing_now = {event.key: event for event in firing}
        self._task = asyncio.create_task(self._loop(), name="budgets")

    def on_facts(self, facts: Sequence[CostFact]) -> None:
        if facts:
            self.watermark = max(self.watermark, max(f.ts + f.duration_s for f in facts))

    def on_job(self, job: JobRecord) -> None:
        return None

    def on_corrected(self, gpu_uuids: set[str]) -> None:
        return None

    async def on_flush(self) -> None:
        return None

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task

    def firing(self) -> list[AlertEvent]:
        return list(self.firing_now.values())

    async def check(self) -> list[AlertEvent]:
        """One evaluation at the stream's event time; returns (and submits) what it decided."""
        as_of = self.watermark if math.isfinite(self.watermark) else None
        found = await asyncio.to_thread(self._read, as_of)
        if found is None:
            return []
        as_of, budgets, spend = found
        events = decide(budgets, spend, as_of, self.firing_now)
        for event in events:
            if event.alert.state is AlertState.firing:
                self.firing_now[event.key] = event
            else:
                self.firing_now.pop(event.key, None)
        if events:
            self.submit(events)
        return events

    def _read(self, as_of: float | None) -> tuple[float, list[Budget], list[SpendRow]] | None:
        as_of = as_of if as_of is not None else latest_fact_time(self._client)
        if as_of is None:
            return None
        budgets = budgets_for_month(active_budgets(self._client), month_of(as_of))
        if not budgets and not self.firing_now:
            return as_of, [], []
        return as_of, budgets, spend_rows(self._client, as_of)

    async def _loop(self) -> None:
        next_at = time.monotonic()
        while True:
            next_at += self.check_every_s
            try:
                await self.check()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the store may be down: try again at the next check
                log.warning("budget check failed (%s); next in %.0f s", exc, self.check_every_s)
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
