"""The worker's alerting: the idle allocated GPU detector as a pipeline observer, and the
observers that make up alerting (idle, budgets, then the dispatcher that delivers).

A restarted worker rebuilds its idle episodes from the store (ledger/idle.py says how) and
delivers the alerts a crash kept it from delivering.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from gpuledger.ledger.facts import FactRecord
from gpuledger.ledger.idle import AlertEvent, IdleTracker
from gpuledger.ledger.idle_rules import IdlePolicy, IdleRule, load_idle_policy
from gpuledger.schema.messages import AlertKind
from gpuledger.streams.alert_delivery import AlertDispatcher
from gpuledger.streams.alert_store import AlertStore, idle_tail, latest_fact_end
from gpuledger.streams.budgets import BudgetObserver
from gpuledger.streams.orphans import OrphanObserver

if TYPE_CHECKING:
    from gpuledger.ledger.cost import JobRecord
    from gpuledger.schema.messages import GpuSample
    from gpuledger.streams.config import WorkerConfig
    from gpuledger.streams.observers import FactObserver, WorkerPort

log = logging.getLogger("gpuledger.alerts")

# How far before the newest fact a restarted worker looks for GPUs whose episodes it rebuilds:
# a GPU silent for longer has no episode that has not fired yet worth going on with.
REBUILD_LOOKBACK_S = 86400.0
# Wall seconds without a GPU's samples after which its ended jobs' episodes are closed.
SILENT_GPU_S = 60.0


class IdleAlertObserver:
    """Feeds the stored facts and job changes to the idle episode tracker; rebuilds it from
    the store at start, and rebuilds the GPUs whose facts late metadata corrected."""

    def __init__(self, config: WorkerConfig, dispatcher: AlertDispatcher) -> None:
        default = IdleRule(
            idle_threshold=config.idle_threshold,
            alert_after_s=config.idle_alert_after_s,
            resolve_after_s=config.idle_resolve_after_s,
            basis=config.idle_basis,
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

    async def start(self, worker: WorkerPort) -> None:
        self._client = worker.store_client
        for job in worker.jobs.values():
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
            client,
            self.policy,
            latest,
            lookback=lookback,
            job_types=self.tracker.job_types,
            idle_below=self.tracker.max_threshold,
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

    def on_samples(self, samples: Sequence[GpuSample]) -> None:
        return None

    def on_facts(self, facts: Sequence[FactRecord]) -> None:
        if self._started:
            self.dispatcher.submit(self.tracker.observe(facts))

    def on_job(self, job: JobRecord) -> None:
        # Before start the jobs are read whole from the worker's state instead.
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
        # A job change marks GPUs stale as it is read; the worker restates their facts in
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
    """The worker's alerting: idle, budget and orphaned memory detectors, then the dispatcher
    (last, so that each flush ships what the others decided in it)."""
    dispatcher = AlertDispatcher(config)
    idle = IdleAlertObserver(config, dispatcher)
    budgets = BudgetObserver(config.budget_check_s, dispatcher.submit, _firing_budget_alerts)
    orphans = OrphanObserver(config.orphan_after_s, dispatcher)
    dispatcher.snapshots = [idle.firing, budgets.firing, orphans.firing]
    return [idle, budgets, orphans, dispatcher]


def _firing_budget_alerts(client: Any) -> list[AlertEvent]:
    return AlertStore(client).latest([AlertKind.budget_burn.value], firing_only=True)
