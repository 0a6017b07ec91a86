"""Alerts out of the stream worker: delivery to the `alerts` table and topic, Alertmanager
and a webhook.

Every destination has a queue and a task of its own that retries with exponential backoff
(up to `alert_retry_max_s`), so that a receiver that is down or slow never holds up the cost
path: the observers only append to a list, and the flush hands it to the queues. Nothing is
dropped silently: a queue that overflows while its receiver is down drops its oldest alerts
with a warning that says how many.

- **Table and topic** (`AlertStore`, then the worker's producer): every row, firing
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

A restarted worker re-sends the alerts a crash kept it from delivering (streams/alerting.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import KW_ONLY, dataclass, field
from typing import TYPE_CHECKING, Any

import aiohttp

from gpuledger.ledger.facts import FactRecord
from gpuledger.ledger.idle import AlertEvent
from gpuledger.schema.messages import AlertKind
from gpuledger.streams.alert_format import alertmanager_alert, webhook_body
from gpuledger.streams.alert_store import AlertStore

if TYPE_CHECKING:
    from gpuledger.ledger.cost import JobRecord
    from gpuledger.schema.messages import GpuSample
    from gpuledger.streams.config import WorkerConfig
    from gpuledger.streams.observers import WorkerPort

log = logging.getLogger("gpuledger.alerts")

MAX_QUEUE = 10_000
HTTP_TIMEOUT_S = 10.0


@dataclass(eq=False)
class Delivery:
    """A queue and a task that sends it with `send`, retrying with exponential backoff."""

    name: str
    send: Callable[[list[AlertEvent]], Any]
    _: KW_ONLY
    retry_max_s: float
    coalesce: bool = False
    batch: int = 200
    sent: int = field(default=0, init=False)
    failures: int = field(default=0, init=False)
    dropped: int = field(default=0, init=False)
    task: asyncio.Task[None] | None = field(default=None, init=False)
    _queue: OrderedDict[Any, AlertEvent] = field(default_factory=OrderedDict, init=False)
    _seq: int = field(default=0, init=False)
    _wake: asyncio.Event = field(default_factory=asyncio.Event, init=False)
    _idle: asyncio.Event = field(default_factory=asyncio.Event, init=False)

    def __post_init__(self) -> None:
        self._idle.set()

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
                await self.send(events)
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
        self._worker: WorkerPort | None = None
        self._session: aiohttp.ClientSession | None = None
        self._resend: asyncio.Task[None] | None = None

    def submit(self, events: Sequence[AlertEvent]) -> None:
        """Queue alerts for the next flush (never blocks: called on the cost path)."""
        self.pending.extend(events)

    async def start(self, worker: WorkerPort) -> None:
        self._worker = worker
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

    def on_samples(self, samples: Sequence[GpuSample]) -> None:
        return None

    def on_facts(self, facts: Sequence[FactRecord]) -> None:
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
        worker = self._worker
        assert worker is not None
        await asyncio.to_thread(AlertStore(worker.store_client).insert, events)
        records = []
        for event in events:
            a = event.alert
            if a.kind is AlertKind.idle_allocated_gpu:
                key = f"{a.gpu_uuid}/{a.job_id}"
            else:
                key = f"budget/{a.team}/{a.project}/{event.rule}"
            records.append((key.encode(), a.model_dump_json().encode()))
        await worker.publish(worker.topics.alerts, records)

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
