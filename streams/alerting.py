"""Alerts out of the stream worker: the idle and budget detectors as pipeline observers, and
delivery to the `alerts` topic, the `alerts` table, Alertmanager and a webhook.

Every destination has a queue and a task of its own that retries with exponential backoff
(up to `alert_retry_max_s`), so that a receiver that is down or slow never holds up the cost
path: the observers only append to a list, and the flush hands it to the queues. Nothing is
dropped silently: a queue that overflows while its receiver is down drops its oldest alerts
with a warning that says how many.

- **Table and topic** (`AlertStore`, then the producer of the pipeline): every row, firing
  updates included. Inserts carry a deduplication token made of the rows' identities, so a
  retried insert is stored once.
- **Alertmanager** (`POST /api/v2/alerts`): every row, the newest per alert winning in the
  queue; the firing ones are also re-sent every `alert_resend_s` (as Prometheus does), so
  that Alertmanager never times them out, and after a restart (of either side) it learns
  them again. Labels `alertname`, `severity`, `team`, `project`, `job_id`, `gpu_uuid`,
  `node` (and `rule`, `month` for budgets; empty ones left out, as Alertmanager would);
  annotations `summary`, `description`, `wasted_usd`; `endsAt` once resolved.
- **Webhook**: changes of state only (fired, resolved), one JSON POST each: the alert, its
  labels and a one-line `text`; or, with `alert_webhook_slack`, Slack's `{"text": ...}`.

A restarted worker rebuilds its idle episodes from the store (ledger/idle.py says how) and
delivers the alerts a crash kept it from delivering.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import aiohttp

from gpuledger.ledger.budgets import SEVERITY, month_of
from gpuledger.ledger.idle import AlertEvent, IdleGap, IdleTracker
from gpuledger.ledger.idle_rules import IdlePolicy, IdleRule, load_idle_policy
from gpuledger.ledger.timekeys import to_ms
from gpuledger.schema.messages import Alert, AlertKind, AlertState
from gpuledger.streams.budgets import BudgetObserver

if TYPE_CHECKING:
    from gpuledger.ledger.cost import JobRecord
    from gpuledger.schema.messages import CostFact
    from gpuledger.streams.config import WorkerConfig
    from gpuledger.streams.pipeline import CostPipeline, FactObserver

log = logging.getLogger("gpuledger.alerts")

ALERT_COLUMNS = [
    "ts", "kind", "rule", "state", "gpu_uuid", "node", "job_id", "team", "project", "since",
    "idle_seconds", "wasted_usd", "message",
]  # fmt: skip
ALERTNAME = {
    AlertKind.idle_allocated_gpu: "GpuIdleAllocated",
    AlertKind.budget_burn: "GpuBudgetBurn",
}
MAX_QUEUE = 10_000
HTTP_TIMEOUT_S = 10.0


# --- the alerts table -------------------------------------------------------------------

# The latest row of each alert; on a tie in ts the resolution wins (as `alerts_firing`).
_LATEST_SQL = """
SELECT toUnixTimestamp64Milli(l.ts), l.kind, l.rule, l.state, l.gpu_uuid, l.node, l.job_id,
       l.team, l.project, toUnixTimestamp64Milli(l.since), l.idle_seconds, l.wasted_usd,
       l.message, toUnixTimestamp64Milli(f.first_ts)
FROM
(
    SELECT * FROM gpuledger.alerts
    WHERE kind IN {kinds:Array(String)}
    ORDER BY ts DESC, state = 'resolved' DESC
    LIMIT 1 BY kind, rule, gpu_uuid, job_id, team, project
) AS l
LEFT JOIN
(
    SELECT kind, rule, gpu_uuid, job_id, team, project, since, min(ts) AS first_ts
    FROM gpuledger.alerts
    WHERE kind IN {kinds:Array(String)} AND state = 'firing'
    GROUP BY kind, rule, gpu_uuid, job_id, team, project, since
) AS f
USING (kind, rule, gpu_uuid, job_id, team, project, since)
WHERE {where:Identifier}
ORDER BY l.ts
"""


def event_from_row(row: Sequence[Any]) -> AlertEvent:
    """An `AlertEvent` from a `_LATEST_SQL` row (times in ms)."""
    (ts, kind, rule, state, gpu, node, job, team, project, since, idle_s, wasted, message,
     first) = row  # fmt: skip
    alert = Alert(
        ts=ts / 1000,
        kind=kind,
        state=state,
        gpu_uuid=gpu,
        node=node,
        job_id=job,
        team=team,
        project=project,
        since=since / 1000,
        idle_seconds=idle_s,
        wasted_usd=wasted,
        message=message,
        rule=rule,
    )
    fired_at = first / 1000 if first else ts / 1000
    return AlertEvent(alert, notify=False, fired_at=fired_at)


@dataclass
class AlertStore:
    """Reads and writes of the `alerts` table, through clickhouse-connect."""

    client: Any

    def insert(self, events: Sequence[AlertEvent]) -> None:
        if not events:
            return
        rows = [
            [
                to_ms(e.alert.ts),
                e.alert.kind.value,
                e.rule,
                e.alert.state.value,
                e.alert.gpu_uuid,
                e.alert.node,
                e.alert.job_id,
                e.alert.team,
                e.alert.project,
                to_ms(e.alert.since),
                e.alert.idle_seconds,
                e.alert.wasted_usd,
                e.alert.message,
            ]
            for e in events
        ]
        digest = hashlib.sha256()
        for event in events:
            digest.update(repr(event.identity).encode())
        self.client.insert(
            "gpuledger.alerts",
            rows,
            column_names=ALERT_COLUMNS,
            settings={"insert_deduplication_token": digest.hexdigest(), "insert_deduplicate": 1},
        )

    def latest(
        self, kinds: Sequence[str], *, firing_only: bool = False, since: float | None = None
    ) -> list[AlertEvent]:
        """The latest row of each alert of these kinds: those firing, and (with `since`)
        those whose latest row is that recent."""
        if firing_only or since is None:
            where = "l.state = 'firing'" if firing_only else "1"
            params: dict[str, Any] = {"kinds": list(kinds)}
        else:
            where = "(l.state = 'firing' OR l.ts >= fromUnixTimestamp64Milli({t:Int64}, 'UTC'))"
            params = {"kinds": list(kinds), "t": to_ms(since)}
        sql = _LATEST_SQL.replace("{where:Identifier}", where)
        return [event_from_row(r) for r in self.client.query(sql, parameters=params).result_rows]

    def identities_since(self, kinds: Sequence[str], since: float) -> set[tuple[Any, ...]]:
        """`AlertEvent.identity` of every row of these kinds from `since` on."""
        result = self.client.query(
            """SELECT kind, rule, gpu_uuid, job_id, team, project, state,
                      toUnixTimestamp64Milli(ts)
               FROM gpuledger.alerts
               WHERE kind IN {kinds:Array(String)}
                 AND ts >= fromUnixTimestamp64Milli({t:Int64}, 'UTC')""",
            parameters={"kinds": list(kinds), "t": to_ms(since)},
        )
        return {tuple(row) for row in result.result_rows}


# --- the facts a restarted worker replays -----------------------------------------------


@dataclass(frozen=True, slots=True)
class StoredFact:
    """The part of a stored fact that idle detection reads (`gpuledger.ledger.idle.FactLike`)."""

    ts: float
    gpu_uuid: str
    node: str
    job_id: str
    team: str
    project: str
    job_type: str
    duration_s: float
    util_sm: float | None
    idle_cost_usd: float
    allocated: int


# How far before the newest fact a restarted worker looks for GPUs whose episodes it rebuilds:
# a GPU silent for longer has no episode that has not fired yet worth going on with.
REBUILD_LOOKBACK_S = 86400.0
# Wall seconds without a GPU's samples after which its ended jobs' episodes are closed.
SILENT_GPU_S = 60.0


def latest_fact_end(client: Any) -> float | None:
    result = client.query(
        """SELECT toUnixTimestamp64Milli(max(ts)), argMax(duration_s, ts), count()
           FROM gpuledger.cost_facts"""
    )
    ts, duration, count = result.result_rows[0]
    return None if not count else ts / 1000 + float(duration)


def gpu_ends(client: Any, since: float, gpus: Sequence[str] | None = None) -> dict[str, float]:
    """The end of each GPU's newest fact, for the GPUs (of `gpus`) with facts from `since` on."""
    result = client.query(
        """SELECT gpu_uuid, toUnixTimestamp64Milli(max(ts)), argMax(duration_s, ts)
           FROM gpuledger.cost_facts
           WHERE ts >= fromUnixTimestamp64Milli({t:Int64}, 'UTC')
             AND ({all:UInt8} = 1 OR gpu_uuid IN {gpus:Array(String)})
           GROUP BY gpu_uuid""",
        parameters={"t": to_ms(since), "all": int(gpus is None), "gpus": list(gpus or [])},
    )
    return {gpu: ms / 1000 + float(d) for gpu, ms, d in result.result_rows}


_FACTS_SQL = """
SELECT toUnixTimestamp64Milli(f.ts) AS t, f.gpu_uuid AS gpu, f.node, f.job_id, f.team,
       f.project, f.job_type, any(f.duration_s), any(f.util_sm), sum(f.idle_cost_usd * f.sign),
       f.allocated
FROM gpuledger.cost_facts AS f
WHERE f.ts >= fromUnixTimestamp64Milli({t:Int64}, 'UTC')
  AND ({all:UInt8} = 1 OR f.gpu_uuid IN {gpus:Array(String)})
GROUP BY t, gpu, f.node, f.job_id, f.team, f.project, f.job_type, f.allocated
HAVING sum(f.sign) > 0
ORDER BY gpu, t
"""


def stored_facts(client: Any, starts: dict[str, float]) -> list[StoredFact]:
    """Live facts (cancelled ones netted out) of each GPU from its start on, in time order."""
    if not starts:
        return []
    result = client.query(
        _FACTS_SQL,
        parameters={"t": to_ms(min(starts.values())), "all": 0, "gpus": sorted(starts)},
    )
    facts = []
    for (
        t,
        gpu,
        node,
        job,
        team,
        project,
        job_type,
        duration,
        util,
        idle_cost,
        allocated,
    ) in result.result_rows:
        if t < to_ms(starts[gpu]):
            continue
        facts.append(
            StoredFact(
                ts=t / 1000,
                gpu_uuid=gpu,
                node=node,
                job_id=job,
                team=team,
                project=project,
                job_type=job_type,
                duration_s=float(duration),
                util_sm=None if util is None else float(util),
                idle_cost_usd=float(idle_cost),
                allocated=int(allocated),
            )
        )
    return facts


def idle_tail(
    client: Any,
    policy: IdlePolicy,
    latest: Sequence[AlertEvent],
    *,
    lookback: float,
    job_types: dict[str, str],
    gpus: Sequence[str] | None = None,
) -> tuple[list[StoredFact], dict[tuple[str, str], IdleGap]]:
    """What `IdleTracker.restore` replays: each GPU's facts since its last `horizon_s()`, or
    since its firing episode's latest row when that is older; and, for firing episodes whose
    latest row predates `lookback` (or whose GPU fell silent), their idle time as a sum."""
    horizon = policy.horizon_s()
    ends = gpu_ends(client, lookback, gpus)
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
        """SELECT sum(d), sum(w), max(t + d) FROM (
               SELECT toUnixTimestamp64Milli(ts) / 1000 AS t, any(duration_s) AS d,
                      any(util_sm) AS u, sum(idle_cost_usd * sign) AS w
               FROM gpuledger.cost_facts
               WHERE gpu_uuid = {g:String} AND job_id = {j:String}
                 AND ts >= fromUnixTimestamp64Milli({a:Int64}, 'UTC')
                 AND ts < fromUnixTimestamp64Milli({b:Int64}, 'UTC')
               GROUP BY ts
               HAVING sum(sign) > 0)
           WHERE u < {thr:Float64}""",
        parameters={
            "g": gpu_uuid,
            "j": job_id,
            "a": to_ms(start),
            "b": to_ms(stop) if stop is not None else 2**62,
            "thr": rule.idle_threshold,
        },
    )
    idle_s, wasted, last_end = result.result_rows[0]
    until = stop if stop is not None else max(start, float(last_end or start))
    return IdleGap(float(idle_s or 0.0), float(wasted or 0.0), until)


# --- what receivers are sent ------------------------------------------------------------


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def alert_labels(event: AlertEvent) -> dict[str, str]:
    a = event.alert
    labels = {
        "alertname": ALERTNAME[a.kind],
        "severity": SEVERITY.get(event.rule, "warning"),
        "team": a.team,
        "project": a.project,
        "job_id": a.job_id,
        "gpu_uuid": a.gpu_uuid,
        "node": a.node,
        "rule": event.rule,
    }
    if a.kind is AlertKind.budget_burn:
        labels["month"] = month_of(a.since)
    return {name: value for name, value in labels.items() if value}


def summary(event: AlertEvent) -> str:
    a = event.alert
    if a.kind is AlertKind.idle_allocated_gpu:
        owner = "/".join(p for p in (a.team, a.project) if p) or "no team"
        return (
            f"Idle allocated GPU {a.gpu_uuid} on {a.node}: job {a.job_id} ({owner}), "
            f"{a.idle_seconds / 60:.0f} min idle, ${a.wasted_usd:,.2f} wasted"
        )
    return a.message


def alertmanager_alert(event: AlertEvent) -> dict[str, Any]:
    """One postable alert of Alertmanager's API v2."""
    a = event.alert
    starts = event.fired_at or a.ts
    body: dict[str, Any] = {
        "labels": alert_labels(event),
        "annotations": {
            "summary": summary(event),
            "description": a.message,
            "wasted_usd": f"{a.wasted_usd:.2f}",
        },
        "startsAt": _iso(starts),
    }
    if a.state is AlertState.resolved:
        body["endsAt"] = _iso(max(a.ts, starts))
    return body


def webhook_body(event: AlertEvent, *, slack: bool) -> dict[str, Any]:
    a = event.alert
    text = f"[{a.state.value.upper()}] {summary(event)}"
    if a.state is AlertState.resolved:
        text += f" ({a.message})"
    if slack:
        return {"text": text}
    return {
        "version": 1,
        "source": "gpuledger",
        "status": a.state.value,
        "rule": event.rule,
        "labels": alert_labels(event),
        "text": text,
        "alert": a.model_dump(mode="json"),
    }


# --- delivery ---------------------------------------------------------------------------


class Delivery:
    """A queue and a task that sends it with `send`, retrying with exponential backoff."""

    def __init__(
        self,
        name: str,
        send: Callable[[list[AlertEvent]], Any],
        *,
        retry_max_s: float,
        coalesce: bool = False,
        batch: int = 200,
    ) -> None:
        self.name = name
        self._send = send
        self.retry_max_s = retry_max_s
        self.coalesce = coalesce
        self.batch = batch
        self._queue: OrderedDict[Any, AlertEvent] = OrderedDict()
        self._seq = 0
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self.sent = 0
        self.failures = 0
        self.dropped = 0
        self.task: asyncio.Task[None] | None = None

    def put(self, events: Sequence[AlertEvent]) -> None:
        for event in events:
            if self.coalesce:
                # Alertmanager needs only the newest state of an alert.
                self._queue.pop(event.key, None)
                self._queue[event.key] = event
            else:
                self._seq += 1
                self._queue[self._seq] = event
        overflow = len(self._queue) - MAX_QUEUE
        if overflow > 0:
            for _ in range(overflow):
                self._queue.popitem(last=False)
            self.dropped += overflow
            log.warning(
                "%s: queue full while it is unreachable: dropped the %d oldest alerts (%d so far)",
                self.name,
                overflow,
                self.dropped,
            )
        if self._queue:
            self._idle.clear()
            self._wake.set()

    def start(self) -> None:
        self.task = asyncio.create_task(self._run(), name=f"alerts:{self.name}")

    async def drained(self, timeout_s: float) -> bool:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        return self._idle.is_set()

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self.task

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._queue:
                keys = list(self._queue)[: self.batch]
                events = [self._queue[k] for k in keys]
                await self._deliver(events)
                for key in keys:
                    # A newer state that arrived meanwhile stays queued.
                    if self._queue.get(key) in events:
                        del self._queue[key]
            self._idle.set()

    async def _deliver(self, events: list[AlertEvent]) -> None:
        delay = min(0.5, self.retry_max_s)
        tries = 0
        last_said = -math.inf
        while True:
            try:
                await self._send(events)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.failures += 1
                tries += 1
                # Say it the first time, then twice a minute: a receiver may be down for hours.
                if time.monotonic() - last_said >= 30.0:
                    last_said = time.monotonic()
                    log.warning(
                        "%s: delivering %d alerts failed (%s; %d tries so far); retrying in "
                        "%.1f s, backing off to every %g s",
                        self.name,
                        len(events),
                        str(exc) or type(exc).__name__,
                        tries,
                        delay,
                        self.retry_max_s,
                    )
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.retry_max_s)
            else:
                self.sent += len(events)
                if tries:
                    log.info("%s: delivered %d alerts after %d tries", self.name, len(events),
                             tries + 1)  # fmt: skip
                return


class AlertDispatcher:
    """The last observer of the pipeline: ships what the detectors decided at each flush."""

    def __init__(self, config: WorkerConfig) -> None:
        self.config = config
        self.pending: list[AlertEvent] = []
        self.snapshots: list[Callable[[], list[AlertEvent]]] = []
        self.deliveries: list[Delivery] = []
        self._record: Delivery | None = None
        self._alertmanager: Delivery | None = None
        self._webhook: Delivery | None = None
        self._pipeline: CostPipeline | None = None
        self._session: aiohttp.ClientSession | None = None
        self._resend: asyncio.Task[None] | None = None

    def submit(self, events: Sequence[AlertEvent]) -> None:
        """Queue alerts for the next flush (never blocks: called on the cost path)."""
        self.pending.extend(events)

    async def start(self, pipeline: CostPipeline) -> None:
        self._pipeline = pipeline
        retry = self.config.alert_retry_max_s
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=HTTP_TIMEOUT_S))
        self._record = Delivery(
            "alerts table and topic", self._store_and_publish, retry_max_s=retry
        )
        self.deliveries = [self._record]
        if self.config.alertmanager_url:
            self._alertmanager = Delivery(
                f"Alertmanager {self.config.alertmanager_url}",
                self._post_alertmanager,
                retry_max_s=retry,
                coalesce=True,
            )
            self.deliveries.append(self._alertmanager)
        if self.config.alert_webhook_url:
            self._webhook = Delivery(
                f"webhook {self.config.alert_webhook_url}",
                self._post_webhook,
                retry_max_s=retry,
                batch=20,
            )
            self.deliveries.append(self._webhook)
        for delivery in self.deliveries:
            delivery.start()
        if self._alertmanager is not None:
            self._resend = asyncio.create_task(self._resend_loop(), name="alerts:resend")
        log.info(
            "alerts: to the table and topic%s%s",
            f", Alertmanager {self.config.alertmanager_url}" if self._alertmanager else "",
            f", webhook {self.config.alert_webhook_url}" if self._webhook else "",
        )

    def on_facts(self, facts: Sequence[CostFact]) -> None:
        return None

    def on_job(self, job: JobRecord) -> None:
        return None

    def on_corrected(self, gpu_uuids: set[str]) -> None:
        return None

    async def on_flush(self) -> None:
        if not self.pending:
            return
        events, self.pending = self.pending, []
        for event in events:
            if event.notify:
                log.info("alert %s: %s", event.alert.state.value, event.alert.message)
        if self._record is not None:
            self._record.put(events)
        if self._alertmanager is not None:
            self._alertmanager.put(events)
        if self._webhook is not None:
            self._webhook.put([e for e in events if e.notify])

    async def stop(self) -> None:
        await self.on_flush()
        if self._resend is not None:
            self._resend.cancel()
        # The store and topic get a while to take the last alerts; receivers a moment.
        if self._record is not None and not await self._record.drained(10.0):
            log.warning("alerts: stopping with alerts not yet stored (a restart redoes them)")
        for delivery in self.deliveries[1:]:
            await delivery.drained(2.0)
        for delivery in self.deliveries:
            await delivery.stop()
        if self._session is not None:
            await self._session.close()

    # -- destinations --------------------------------------------------------------------
    async def _store_and_publish(self, events: list[AlertEvent]) -> None:
        pipeline = self._pipeline
        assert pipeline is not None
        await asyncio.to_thread(AlertStore(pipeline.sink.client).insert, events)
        producer = pipeline._producer
        if producer is None:
            return
        sends = []
        for event in events:
            a = event.alert
            if a.kind is AlertKind.idle_allocated_gpu:
                key = f"{a.gpu_uuid}/{a.job_id}"
            else:
                key = f"budget/{a.team}/{a.project}/{event.rule}"
            sends.append(
                await producer.send(
                    pipeline.topics.alerts, key=key.encode(), value=a.model_dump_json().encode()
                )
            )
        await asyncio.gather(*sends)

    async def _post_alertmanager(self, events: list[AlertEvent]) -> None:
        assert self._session is not None and self.config.alertmanager_url
        url = self.config.alertmanager_url.rstrip("/") + "/api/v2/alerts"
        async with self._session.post(url, json=[alertmanager_alert(e) for e in events]) as r:
            if r.status >= 300:
                raise RuntimeError(f"HTTP {r.status}: {(await r.text())[:300]}")

    async def _post_webhook(self, events: list[AlertEvent]) -> None:
        assert self._session is not None and self.config.alert_webhook_url
        slack = self.config.alert_webhook_slack
        for event in events:
            body = webhook_body(event, slack=slack)
            async with self._session.post(self.config.alert_webhook_url, json=body) as r:
                if r.status >= 300:
                    raise RuntimeError(f"HTTP {r.status}: {(await r.text())[:300]}")

    async def _resend_loop(self) -> None:
        # At start too: an Alertmanager that restarted, or this worker, learns what fires.
        while True:
            if self._alertmanager is not None:
                firing = [e for snapshot in self.snapshots for e in snapshot()]
                if firing:
                    self._alertmanager.put(firing)
            await asyncio.sleep(self.config.alert_resend_s)


# --- idle allocated GPUs ----------------------------------------------------------------


class IdleAlertObserver:
    """Feeds the stored facts and job changes to the idle episode tracker; rebuilds it from
    the store at start, and rebuilds the GPUs whose facts late metadata corrected."""

    def __init__(self, config: WorkerConfig, dispatcher: AlertDispatcher) -> None:
        default = IdleRule(
            idle_threshold=config.idle_threshold,
            alert_after_s=config.idle_alert_after_s,
            resolve_after_s=config.idle_resolve_after_s,
        )
        # A bad rules file stops the worker at start, with the rule and field to fix.
        self.policy: IdlePolicy = load_idle_policy(
            default, config.idle_rules_file, config.idle_update_every_s
        )
        self.dispatcher = dispatcher
        self.tracker = IdleTracker(self.policy)
        self.rebuilt_gpus = 0
        self._client: Any = None
        self._started = False
        self._corrected_next: set[str] = set()
        self._heard: dict[str, tuple[float, float]] = {}

    async def start(self, pipeline: CostPipeline) -> None:
        self._client = pipeline.sink.client
        for job in pipeline.state.jobs.values():
            self._job(job)
        self.tracker.stale.clear()  # the store is read whole just below
        owed = await asyncio.to_thread(self._restore)
        self._started = True
        firing = sum(1 for ep in self.tracker.episodes.values() if ep.fired_at is not None)
        log.info(
            "idle alerts: %d open episodes (%d firing) rebuilt from the store; %d alerts owed",
            len(self.tracker.episodes),
            firing,
            len(owed),
        )
        self.dispatcher.submit(owed)

    def _restore(self) -> list[AlertEvent]:
        client = self._client
        last = latest_fact_end(client)
        if last is None:
            return []
        horizon = self.policy.horizon_s()
        lookback = last - max(REBUILD_LOOKBACK_S, horizon)
        kinds = [AlertKind.idle_allocated_gpu.value]
        store = AlertStore(client)
        latest = store.latest(kinds, since=lookback)
        tail, gaps = idle_tail(
            client, self.policy, latest, lookback=lookback, job_types=self.tracker.job_types
        )
        return self.tracker.restore(
            latest=latest,
            gaps=gaps,
            tail=tail,
            recorded=store.identities_since(kinds, lookback),
        )

    def _job(self, job: JobRecord) -> list[AlertEvent]:
        return self.tracker.job_changed(
            job.job_id,
            job.end(),
            start=job.started_at,
            gpus=job.gpu_uuids,
            job_type=job.job_type.value if job.job_type else "",
        )

    def on_facts(self, facts: Sequence[CostFact]) -> None:
        if self._started:
            self.dispatcher.submit(self.tracker.observe(facts))

    def on_job(self, job: JobRecord) -> None:
        # Before start the jobs are read whole from the pipeline's state instead.
        if self._started:
            self.dispatcher.submit(self._job(job))

    def on_corrected(self, gpu_uuids: set[str]) -> None:
        # Restated facts may open or close episodes: the GPUs are rebuilt from the store.
        # A job change read before the tracker knew the GPU (a restarted worker redoing the
        # corrections it owed) does not mark it stale by itself.
        if self._started:  # before, the restore reads the store as the corrections left it
            self.tracker.stale |= gpu_uuids

    async def on_flush(self) -> None:
        # GPUs waiting for a sample past their job's end: has their newest sample moved?
        now = time.monotonic()
        silent = []
        waiting = self.tracker.gpus_with_ended_jobs()
        for gpu in waiting:
            end = self.tracker.gpu_end(gpu)
            seen = self._heard.get(gpu)
            if seen is None or seen[0] != end:
                self._heard[gpu] = (end, now)
            elif now - seen[1] > SILENT_GPU_S:
                silent.append(gpu)
        for gpu in set(self._heard) - waiting:
            del self._heard[gpu]
        if silent:
            self.dispatcher.submit(self.tracker.expire(silent))
        await self._rebuild_corrected()

    async def _rebuild_corrected(self) -> None:
        # A job change marks GPUs stale as it is read; the pipeline restates their facts in
        # the flush that follows, at the latest: rebuild them one flush later.
        ready, self._corrected_next = self._corrected_next, set(self.tracker.stale)
        ready &= self.tracker.stale
        if not ready:
            return
        gpus = sorted(ready)
        latest = self.tracker.latest_of(gpus)
        lookback = self.tracker.watermark - max(REBUILD_LOOKBACK_S, self.policy.horizon_s())
        tail, gaps = await asyncio.to_thread(
            idle_tail,
            self._client,
            self.policy,
            latest,
            lookback=lookback,
            job_types=self.tracker.job_types,
            gpus=gpus,
        )
        owed = self.tracker.rebuild(gpus, tail=tail, gaps=gaps)
        self.rebuilt_gpus += len(gpus)
        log.info(
            "idle alerts: %d GPUs rebuilt from their corrected facts (%s); %d alerts owed",
            len(gpus),
            ", ".join(gpus[:5]) + (" …" if len(gpus) > 5 else ""),
            len(owed),
        )
        self.dispatcher.submit(owed)

    async def stop(self) -> None:
        return None

    def firing(self) -> list[AlertEvent]:
        return self.tracker.firing()


def alert_observers(config: WorkerConfig) -> list[FactObserver]:
    """The worker's alerting: idle and budget detectors, then the dispatcher (last, so that
    each flush ships what the others decided in it)."""
    dispatcher = AlertDispatcher(config)
    idle = IdleAlertObserver(config, dispatcher)
    budgets = BudgetObserver(config.budget_check_s, dispatcher.submit, _firing_budget_alerts)
    dispatcher.snapshots = [idle.firing, budgets.firing]
    return [idle, budgets, dispatcher]


def _firing_budget_alerts(client: Any) -> list[AlertEvent]:
    return AlertStore(client).latest([AlertKind.budget_burn.value], firing_only=True)
