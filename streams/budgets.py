"""The worker's side of budgets: loading them into the store, reading spend back from its
rollups, and the observer that runs `gpuledger.ledger.budgets.decide` every `budget_check_s`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from gpuledger.ledger.budgets import (
    COLUMNS,
    Budget,
    SpendRow,
    budgets_for_month,
    decide,
    month_bounds,
    month_of,
    projected_usd,
    spend_of,
)
from gpuledger.ledger.facts import FactRecord
from gpuledger.ledger.idle import AlertEvent, AlertKey
from gpuledger.ledger.timekeys import to_ms
from gpuledger.schema.messages import AlertState
from gpuledger.streams import sql
from gpuledger.streams.alert_store import latest_fact_end

if TYPE_CHECKING:
    from gpuledger.ledger.cost import JobRecord
    from gpuledger.schema.messages import GpuSample
    from gpuledger.streams.observers import WorkerPort

log = logging.getLogger("gpuledger.budgets")

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
    stamp = to_ms(now)
    if rows:
        client.insert(
            "gpuledger.budgets",
            [[*row, stamp] for row in rows],
            column_names=[*COLUMNS, "active", "source", "loaded_at"],
        )
    return len(removed)


def active_budgets(client: Any) -> list[Budget]:
    result = client.query(sql.ACTIVE_BUDGETS)
    return [Budget(m, t, p, float(usd)) for m, t, p, usd in result.result_rows]


def spend_rows(client: Any, as_of: float) -> list[SpendRow]:
    """Spend per (team, project): this month up to `as_of`, and in the hour before it."""
    month_start, _ = month_bounds(as_of)
    params = {"start": round(month_start), "asof": round(as_of), "hour": round(as_of - 3600)}
    result = client.query(sql.SPEND, parameters=params)
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
    as_of = as_of if as_of is not None else latest_fact_end(client)
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
        check_every_s: float,
        submit: Callable[[Sequence[AlertEvent]], None],
        load_firing: Callable[[Any], list[AlertEvent]],
    ) -> None:
        self.check_every_s = check_every_s
        self.submit = submit
        self.load_firing = load_firing
        self.watermark = -math.inf
        self.firing_now: dict[AlertKey, AlertEvent] = {}
        self._client: Any = None
        self._task: asyncio.Task[None] | None = None

    async def start(self, worker: WorkerPort) -> None:
        self._client = worker.store_client
        firing = await asyncio.to_thread(self.load_firing, self._client)
        self.firing_now = {event.key: event for event in firing}
        self._task = asyncio.create_task(self._loop(), name="budgets")

    def on_samples(self, samples: Sequence[GpuSample]) -> None:
        return None

    def on_facts(self, facts: Sequence[FactRecord]) -> None:
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
        as_of = as_of if as_of is not None else latest_fact_end(self._client)
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
