"""The orphaned GPU memory detector as a pipeline observer: the stored samples' processes and
the jobs known go to the pure tracker (`gpuledger.ledger.orphans`); its alerts go out through
the same dispatcher as the idle alerts (table, topic, Alertmanager, webhook)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

from gpuledger.ledger.facts import FactRecord
from gpuledger.ledger.idle import AlertEvent
from gpuledger.ledger.orphans import OrphanTracker
from gpuledger.schema.messages import AlertKind
from gpuledger.streams.alert_store import AlertStore

if TYPE_CHECKING:
    from gpuledger.ledger.cost import JobRecord
    from gpuledger.schema.messages import GpuSample
    from gpuledger.streams.alert_delivery import AlertDispatcher
    from gpuledger.streams.observers import WorkerPort

log = logging.getLogger("gpuledger.alerts")


class OrphanObserver:
    def __init__(self, after_s: float, dispatcher: AlertDispatcher) -> None:
        self.tracker = OrphanTracker(after_s)
        self.dispatcher = dispatcher
        self.worker: WorkerPort | None = None
        self.usd_per_gpu_hour: dict[str, float] = {}

    async def start(self, worker: WorkerPort) -> None:
        self.worker = worker
        store = AlertStore(worker.store_client)
        kinds = [AlertKind.orphaned_gpu_memory.value]
        firing = await asyncio.to_thread(store.latest, kinds, firing_only=True)
        self.tracker.restore(event.alert for event in firing)
        log.info("orphaned GPU memory: %d firing episodes carried on", len(self.tracker.firing()))

    def on_facts(self, facts: Sequence[FactRecord]) -> None:
        for fact in facts:
            if fact.sign > 0:
                self.usd_per_gpu_hour[fact.gpu_uuid] = fact.usd_per_gpu_hour

    def on_samples(self, samples: Sequence[GpuSample]) -> None:
        worker = self.worker
        if worker is None:  # not started: the store's firing orphans are not known yet
            return
        events = self.tracker.observe(samples, worker.jobs, worker.holder, self.usd_per_gpu_hour)
        self.dispatcher.submit(events)

    def on_job(self, job: JobRecord) -> None:
        return None  # jobs and their GPUs are read from the worker's state as samples come

    def on_corrected(self, gpu_uuids: set[str]) -> None:
        return None

    async def on_flush(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    def firing(self) -> list[AlertEvent]:
        return self.tracker.firing()
