"""The orphaned GPU memory detector as a pipeline observer: the stored samples' processes and
the jobs known go to the pure tracker (`gpuledger.ledger.orphans`); its alerts go out through
the same dispatcher as the idle alerts (table, topic, Alertmanager, webhook)."""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from gpuledger.ledger.idle import AlertEvent
from gpuledger.ledger.orphans import OrphanTracker
from gpuledger.schema.messages import AlertKind
from gpuledger.streams.alert_store import AlertStore

if TYPE_CHECKING:
    from gpuledger.ledger.cost import JobRecord
    from gpuledger.schema.messages import CostFact, GpuSample
    from gpuledger.streams.alert_delivery import AlertDispatcher
    from gpuledger.streams.observers import WorkerPort

log = logging.getLogger("gpuledger.alerts")

# A job that ended this long before a sample no longer holds its GPU for any sample to come.
FORGET_ENDED_S = 86400.0


class OrphanObserver:
    def __init__(self, after_s: float, dispatcher: AlertDispatcher) -> None:
        self.tracker = OrphanTracker(after_s)
        self.dispatcher = dispatcher
        self.jobs: Mapping[str, JobRecord] = {}
        self.by_gpu: dict[str, set[str]] = defaultdict(set)
        self.usd_per_gpu_hour: dict[str, float] = {}

    async def start(self, worker: WorkerPort) -> None:
        self.jobs = worker.jobs
        for job in self.jobs.values():
            self.on_job(job)
        store = AlertStore(worker.store_client)
        kinds = [AlertKind.orphaned_gpu_memory.value]
        firing = await asyncio.to_thread(store.latest, kinds, firing_only=True)
        self.tracker.restore(event.alert for event in firing)
        log.info("orphaned GPU memory: %d firing episodes carried on", len(self.tracker.firing()))

    def on_facts(self, facts: Sequence[CostFact]) -> None:
        for fact in facts:
            if fact.sign > 0:
                self.usd_per_gpu_hour[fact.gpu_uuid] = fact.usd_per_gpu_hour

    def on_samples(self, samples: Sequence[GpuSample]) -> None:
        events = self.tracker.observe(samples, self.jobs, self._holder, self.usd_per_gpu_hour)
        self.dispatcher.submit(events)

    def _holder(self, gpu_uuid: str, t: float) -> JobRecord | None:
        ids = self.by_gpu.get(gpu_uuid)
        if not ids:
            return None
        for job_id in list(ids):
            job = self.jobs.get(job_id)
            if job is None or job.end() < t - FORGET_ENDED_S:
                ids.discard(job_id)  # a GPU's list of jobs does not grow without bound
            elif job.holds(gpu_uuid, t):
                return job
        return None

    def on_job(self, job: JobRecord) -> None:
        for gpu in job.gpu_uuids:
            self.by_gpu[gpu].add(job.job_id)

    def on_corrected(self, gpu_uuids: set[str]) -> None:
        return None

    async def on_flush(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    def firing(self) -> list[AlertEvent]:
        return self.tracker.firing()
