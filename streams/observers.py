"""What follows the stored facts (idle alerts, budgets), and the narrow view of the worker
it is handed: the store, the jobs known, publishing, and store calls with retries.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from gpuledger.ledger.cost import JobRecord
from gpuledger.ledger.facts import FactRecord
from gpuledger.schema.messages import GpuSample
from gpuledger.schema.topics import Topics


class WorkerPort(Protocol):
    """The worker as its observers see it."""

    @property
    def topics(self) -> Topics: ...

    @property
    def store_client(self) -> Any:
        """The clickhouse-connect client of the worker's store."""

    @property
    def jobs(self) -> Mapping[str, JobRecord]:
        """Every job known, by id."""

    def holder(self, gpu_uuid: str, t: float) -> JobRecord | None:
        """The job its scheduler gave the GPU at t, or None (the worker's costing decides so)."""

    async def publish(self, topic: str, records: Sequence[tuple[bytes, bytes]]) -> None:
        """Send (key, value) records to a topic and wait until the broker has them all."""

    async def run_with_retries(self, func: Callable[..., Any], *args: Any) -> Any:
        """A store call, retried with backoff while the store fails."""


class FactObserver(Protocol):
    """Something that follows the facts as they are stored (idle alerts, budgets).

    Called on the worker's loop; `on_facts` and `on_job` must be quick and never block:
    slow work (delivering alerts) belongs in `on_flush` or a task of the observer's own.
    """

    async def start(self, worker: WorkerPort) -> None: ...

    def on_facts(self, facts: Sequence[FactRecord]) -> None: ...

    def on_samples(self, samples: Sequence[GpuSample]) -> None:
        """The samples of those facts (their processes: orphaned GPU memory)."""

    def on_job(self, job: JobRecord) -> None: ...

    def on_corrected(self, gpu_uuids: set[str]) -> None:
        """These GPUs' stored facts were just cancelled and restated."""

    async def on_flush(self) -> None: ...

    async def stop(self) -> None: ...
