"""The stream worker's reads and writes of alerts and of the facts idle detection replays:
the `alerts` table (latest row per alert, rows stored), and a restarted worker's replay of
recent facts (ledger/idle.py says how episodes are rebuilt from them).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from gpuledger.ledger.idle import AlertEvent, IdleGap, StoredFact
from gpuledger.ledger.idle_rules import IdlePolicy, IdleRule
from gpuledger.ledger.timekeys import to_ms
from gpuledger.schema.messages import Alert, AlertState, IdleBasis
from gpuledger.streams import sql

ALERT_COLUMNS = list(sql.ALERTS.names)


# --- the alerts table -------------------------------------------------------------------


def event_from_row(row: Sequence[Any]) -> AlertEvent:
    """An `AlertEvent` from a `sql.latest_alerts` row (times in ms)."""
    *columns, first = row
    alert = Alert(**sql.ALERTS.named(columns))
    return AlertEvent(alert, notify=False, fired_at=first / 1000 if first else alert.ts)


def _token(events: Sequence[AlertEvent]) -> str:
    """The deduplication token of an insert: a digest of its rows' identities."""
    digest = hashlib.sha256()
    for event in events:
        digest.update(repr(event.identity).encode())
    return digest.hexdigest()


@dataclass
class AlertStore:
    """Reads and writes of the `alerts` table, through clickhouse-connect."""

    client: Any

    def insert(self, events: Sequence[AlertEvent]) -> None:
        if events:
            self.client.insert(
                "gpuledger.alerts",
                [sql.ALERTS.row(e.alert.model_dump(mode="json")) for e in events],
                column_names=ALERT_COLUMNS,
                settings={"insert_deduplication_token": _token(events), "insert_deduplicate": 1},
            )

    def latest(
        self, kinds: Sequence[str], *, firing_only: bool = False, since: float | None = None
    ) -> list[AlertEvent]:
        """The latest row of each alert of these kinds: those firing, and (with `since`)
        those whose latest row is that recent."""
        if firing_only or since is None:
            where = sql.FIRING if firing_only else "1"
            params: dict[str, Any] = {"kinds": list(kinds)}
        else:
            where = sql.FIRING_OR_SINCE
            params = {"kinds": list(kinds), "t": to_ms(since)}
        result = self.client.query(sql.latest_alerts(where), parameters=params)
        return [event_from_row(r) for r in result.result_rows]

    def identities_since(self, kinds: Sequence[str], since: float) -> set[tuple[Any, ...]]:
        """`AlertEvent.identity` of every row of these kinds from `since` on."""
        result = self.client.query(
            sql.ALERT_IDENTITIES_SINCE,
            parameters={"kinds": list(kinds), "t": to_ms(since)},
        )
        return {tuple(row) for row in result.result_rows}


# --- the facts a restarted worker replays -----------------------------------------------


def latest_fact_end(client: Any) -> float | None:
    """The newest fact's end (event time), or None when there is none."""
    result = client.query(sql.LATEST_FACT_END)
    ts, duration, count = result.result_rows[0]
    return None if not count else ts / 1000 + float(duration)


# Silent GPUs judged per read of their facts: a read starts at the horizon of its earliest.
SILENT_GPUS_PER_READ = 300


def gpu_ends(
    client: Any,
    since: float,
    gpus: Sequence[str] | None = None,
    *,
    query: str = sql.GPU_ENDS,
    **params: Any,
) -> dict[str, float]:
    """The end of each GPU's newest fact, for the GPUs (of `gpus`) with facts from `since` on;
    `query` and `params` narrow them further (`GPU_ENDS_MAY_IDLE`)."""
    result = client.query(
        query,
        parameters={
            "t": to_ms(since),
            "all": int(gpus is None),
            "gpus": list(gpus or []),
            **params,
        },
    )
    return {gpu: ms / 1000 + float(d) for gpu, ms, d in result.result_rows}


def gpu_ends_that_may_idle(
    client: Any, since: float, horizon_s: float, threshold: float, keep: Sequence[str]
) -> dict[str, float]:
    """`gpu_ends` of the GPUs in `keep` and of those with an allocated fact under `threshold`
    in the last `horizon_s` before their newest, among the GPUs with facts from `since` on.

    Read without scanning every fact from `since` (a day of the fleet): the GPUs whose newest
    fact is within a horizon of the store's newest are judged from the facts of the last two
    horizons; the others, silent since, from their own facts, a few hundred at a time in the
    order they fell silent, so that each read starts near its GPUs' horizons."""
    result = client.query(sql.GPU_LAST_TS, parameters={"t": to_ms(since)})
    last = {gpu: ms / 1000 for gpu, ms in result.result_rows}
    if not last:
        return {}
    recent_from = max(last.values()) - horizon_s  # a GPU heard from since: its horizon is
    window = max(since, recent_from - horizon_s)  # within the last two horizons' facts
    judge: dict[str, Any] = {"keep": sorted(keep), "thr": threshold, "h": to_ms(horizon_s)}
    may_idle = sql.GPU_ENDS_MAY_IDLE
    ends = {
        g: end
        for g, end in gpu_ends(client, window, query=may_idle, **judge).items()
        if last.get(g, end) >= recent_from
    }
    silent = sorted((g for g, t in last.items() if t < recent_from), key=last.__getitem__)
    for i in range(0, len(silent), SILENT_GPUS_PER_READ):
        chunk = silent[i : i + SILENT_GPUS_PER_READ]
        start = max(since, last[chunk[0]] - horizon_s)
        ends.update(gpu_ends(client, start, chunk, query=may_idle, **judge))
    return ends


def stored_facts(client: Any, starts: dict[str, float]) -> list[StoredFact]:
    """Live facts (cancelled ones netted out) of each GPU from its start on, in time order."""
    if not starts:
        return []
    result = client.query(
        sql.LIVE_FACTS,
        parameters={"t": to_ms(min(starts.values())), "all": 0, "gpus": sorted(starts)},
    )
    # A row is a `StoredFact`'s fields in order, its time in ms.
    return [
        StoredFact(t / 1000, gpu, *fields)
        for t, gpu, *fields in result.result_rows
        if t >= to_ms(starts[gpu])
    ]


def idle_tail(
    client: Any,
    policy: IdlePolicy,
    latest: Sequence[AlertEvent],
    *,
    lookback: float,
    job_types: dict[str, str],
    gpus: Sequence[str] | None = None,
    idle_below: float | None = None,
) -> tuple[list[StoredFact], dict[tuple[str, str], IdleGap]]:
    """What `IdleTracker.restore` replays: each GPU's facts since its last `horizon_s()`, or
    since its firing episode's latest row when that is older; and, for firing episodes whose
    latest row predates `lookback` (or whose GPU fell silent), their idle time as a sum.
    With `idle_below` (every rule's highest threshold) only the GPUs that may have an episode
    are replayed: a firing one, or one with an allocated fact under it in that time."""
    horizon = policy.horizon_s()
    if idle_below is None:
        ends = gpu_ends(client, lookback, gpus)
    else:
        firing = [e.alert.gpu_uuid for e in latest if e.alert.state is AlertState.firing]
        ends = gpu_ends_that_may_idle(client, lookback, horizon, idle_below, firing)
    starts = {gpu: max(end - horizon, lookback) for gpu, end in ends.items()}
    gaps: dict[tuple[str, str], IdleGap] = {}
    for event in latest:
        a = event.alert
        if a.state is not AlertState.firing:
            continue
        rule = policy.rule_for(a.team, job_types.get(a.job_id, ""))
        if a.gpu_uuid not in ends:
            gaps[(a.gpu_uuid, a.job_id)] = idle_gap(client, a.gpu_uuid, a.job_id, a.ts, None, rule)
        elif a.ts < lookback:
            gaps[(a.gpu_uuid, a.job_id)] = idle_gap(
                client, a.gpu_uuid, a.job_id, a.ts, lookback, rule
            )
            starts[a.gpu_uuid] = lookback
        else:
            # From the row on, so that a busy spell after it counts whole.
            starts[a.gpu_uuid] = min(starts[a.gpu_uuid], a.ts)
    return stored_facts(client, starts), gaps


def idle_gap(
    client: Any, gpu_uuid: str, job_id: str, start: float, stop: float | None, rule: IdleRule
) -> IdleGap:
    """Idle seconds and dollars of a (GPU, job) in [start, stop) (stop None: to its end),
    by the rule's threshold."""
    result = client.query(
        sql.IDLE_GAP,
        parameters={
            "g": gpu_uuid,
            "j": job_id,
            "a": to_ms(start),
            "b": to_ms(stop) if stop is not None else 2**62,
            "thr": rule.idle_threshold,
            "sm": int(rule.basis is IdleBasis.sm_active),
        },
    )
    idle_s, wasted, last_end = result.result_rows[0]
    until = stop if stop is not None else max(start, float(last_end or start))
    return IdleGap(float(idle_s or 0.0), float(wasted or 0.0), until)
