"""Jobs, prices and nodes into the worker: read from the start of their topics by every
worker (after the state stored in ClickHouse: Faust's changelog recovery is not reliable on
the embedded broker, ARCHITECTURE.md §5, and every worker needs all of it), applied to the
state, and what changed stored.

Each change yields the scopes of stored facts it may alter: pending until the next flush
corrects them, and kept in a log (per metadata offset) for a worker that takes a samples
partition over to redo what the previous owner may have left undone (streams/corrections.py).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, TypeVar

from aiokafka import AIOKafkaConsumer
from aiokafka.errors import KafkaError
from aiokafka.structs import ConsumerRecord, TopicPartition

from gpuledger.ledger.cost import JobRecord
from gpuledger.ledger.restate import Scope
from gpuledger.schema.messages import JobEvent, NodeInfo, PriceEntry
from gpuledger.streams.deadletters import failure_reason, quote

if TYPE_CHECKING:
    from gpuledger.streams.parts import WorkerParts

log = logging.getLogger("gpuledger.worker")

_Row = TypeVar("_Row", PriceEntry, NodeInfo)
MetaKey = tuple[str, int]  # a metadata topic and partition
ScopeLog = list[tuple[MetaKey, int, tuple[Scope, ...]]]  # (partition, offset, its scopes)


class MetadataFeed:
    """The metadata consumer, what it applied (`next_offsets`), the scopes pending and
    logged, and the rows to store at the next flush."""

    def __init__(self, parts: WorkerParts) -> None:
        self.parts = parts
        self.consumer: AIOKafkaConsumer | None = None
        self.next_offsets: dict[MetaKey, int] = {}
        self.scope_log: ScopeLog = []
        self.log_floor: dict[MetaKey, int] = {}
        self.pending_scopes: list[Scope] = []
        self.dirty_jobs: dict[str, JobRecord] = {}
        self.dirty_prices: list[PriceEntry] = []
        self.dirty_nodes: list[NodeInfo] = []
        # The message each dirty job, price and node row came from: a row the store refuses
        # is dead-lettered as that message.
        self.sources: dict[tuple[str, str], ConsumerRecord] = {}

    async def open(self, bootstrap: str) -> tuple[list[TopicPartition], set[int]]:
        """Start the consumer at the start of every metadata partition; return them, and
        the partitions of the samples topic."""
        self.consumer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap, enable_auto_commit=False, group_id=None
        )
        await self.consumer.start()
        # Read before assign(): the consumer then keeps metadata of its assigned topics only.
        samples = set(self.consumer.partitions_for_topic(self.parts.topics.samples) or {0})
        meta_topics = [self.parts.topics.jobs, self.parts.topics.prices, self.parts.topics.nodes]
        partitions = [
            TopicPartition(t, p)
            for t in meta_topics
            for p in (self.consumer.partitions_for_topic(t) or {0})
        ]
        self.consumer.assign(partitions)
        await self.consumer.seek_to_beginning(*partitions)
        return partitions, samples

    def take_scopes(self) -> tuple[list[Scope], dict[MetaKey, int]]:
        """The scopes pending, and the offsets of the metadata they come from."""
        scopes, self.pending_scopes = self.pending_scopes, []
        return scopes, dict(self.next_offsets)

    async def catch_up(self, partitions: list[TopicPartition]) -> None:
        """Read jobs, prices and nodes to their end before the first sample is costed."""
        assert self.consumer is not None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            batches = await self.consumer.getmany(timeout_ms=300, max_records=5000)
            for tp, records in batches.items():
                self.apply(tp, records, catching_up=True)
            if not batches and all([await self._at_end(tp) for tp in partitions]):
                break
        # What the topics replayed that the store did not know is stored; the corrections it
        # calls for wait in the scope log until this worker owns samples partitions.
        await self.store()

    async def _at_end(self, tp: TopicPartition) -> bool:
        assert self.consumer is not None
        position = await self.consumer.position(tp)
        # The high watermark of a fetch response is right on the embedded broker; its
        # end_offsets() is not (ARCHITECTURE.md §5), so only trust that for an empty partition.
        high = self.consumer.highwater(tp)
        if high is None:
            ends = await self.consumer.end_offsets([tp])
            return bool(position >= ends.get(tp, 0))
        return bool(position >= high)

    async def consume(self) -> None:
        assert self.consumer is not None
        while True:
            try:
                batches = await self.consumer.getmany(timeout_ms=200, max_records=5000)
            except KafkaError as exc:  # the broker is away: the consumer reconnects
                log.warning("metadata fetch failed (%s); retrying", exc)
                await asyncio.sleep(1.0)
                continue
            for tp, records in batches.items():
                self.apply(tp, records)

    def apply(
        self,
        tp: TopicPartition,
        records: Sequence[ConsumerRecord],
        *,
        catching_up: bool = False,
    ) -> None:
        short = self.parts.topics.short(tp.topic)
        key: MetaKey = (tp.topic, tp.partition)
        floor = self.log_floor.get(key, 0)
        for record in records:
            self.next_offsets[key] = record.offset + 1
            # Known to the store, but maybe not corrected everywhere yet.
            recover = catching_up and record.offset >= floor
            try:
                if short == "jobs":
                    changes = self._job(record, recover)
                elif short == "prices":
                    changes = self._price(record, recover)
                else:
                    changes = self._node(record, recover)
            except Exception as exc:  # whatever fails on one message costs that message only
                self.parts.letters.of_record(record, failure_reason(exc))
                continue
            if not changes:
                continue
            if not catching_up:
                self.pending_scopes.extend(changes)
            if record.offset >= floor:
                self.scope_log.append((key, record.offset, tuple(changes)))

    def _job(self, record: ConsumerRecord, recover: bool) -> list[Scope]:
        event = JobEvent.model_validate_json(record.value)
        before = self.parts.state.jobs.get(event.job_id)
        changes = self.parts.state.apply_job(event)
        job = self.parts.state.jobs[event.job_id]
        if changes or not _same_record(before, job):
            # A job's record can move with no fact changing hands (the end of a job known
            # only by its processes' labels): it is stored all the same.
            self.dirty_jobs[event.job_id] = job
            self.sources[("jobs", event.job_id)] = record
            for observer in self.parts.observers:
                observer.on_job(job)
        elif recover:
            changes = self.parts.state.job_recovery_scopes(event.job_id)
        return changes

    def _price(self, record: ConsumerRecord, recover: bool) -> list[Scope]:
        entry = PriceEntry.model_validate_json(record.value)
        state = self.parts.state
        scopes = state.price_scopes if recover else None
        return self._keep(
            record, ("prices", entry.key), entry, self.dirty_prices, state.apply_price, scopes
        )

    def _node(self, record: ConsumerRecord, recover: bool) -> list[Scope]:
        info = NodeInfo.model_validate_json(record.value)
        state = self.parts.state
        scopes = state.node_scopes if recover else None
        return self._keep(
            record, ("nodes", node_key(info)), info, self.dirty_nodes, state.apply_node, scopes
        )

    def _keep(
        self,
        record: ConsumerRecord,
        source: tuple[str, str],
        row: _Row,
        dirty: list[_Row],
        apply: Callable[[_Row], list[Scope]],
        scopes: Callable[[_Row], list[Scope]] | None,
    ) -> list[Scope]:
        """A price or a node applied: kept to store when it changed the state; else, with
        `scopes` (recovering), the scopes of the facts it governs."""
        changes = apply(row)
        if changes:
            dirty.append(row)
            self.sources[source] = record
        elif scopes is not None:
            changes = scopes(row)
        return changes

    async def store(self) -> None:
        """Store the jobs, prices and nodes that changed; a row the store refuses is
        dead-lettered as the message it came from."""
        jobs, self.dirty_jobs = list(self.dirty_jobs.values()), {}
        prices, self.dirty_prices = self.dirty_prices, []
        nodes, self.dirty_nodes = self.dirty_nodes, []
        sources, self.sources = self.sources, {}
        now = time.time()

        def refuse(kind: str, key: str, exc: Exception) -> None:
            self.parts.stats.refused_by_store += 1
            record = sources.get((kind, key))
            if record is None:  # a row of the state rebuilt from the store: no message
                log.error("the store refuses %s %s: %s", kind, quote(key), failure_reason(exc))
            else:
                self.parts.letters.of_record(record, failure_reason(exc))

        sink = self.parts.sink()
        if jobs:
            await self.parts.calls.store_rows(
                sink.upsert_jobs, jobs, lambda j, exc: refuse("jobs", j.job_id, exc)
            )
        if prices:
            await self.parts.calls.store_rows(
                sink.upsert_prices, prices, lambda e, exc: refuse("prices", e.key, exc), now
            )
        if nodes:
            await self.parts.calls.store_rows(
                sink.upsert_nodes, nodes, lambda n, exc: refuse("nodes", node_key(n), exc)
            )

    def position(self) -> str:
        return ", ".join(f"{t}[{p}]@{o}" for (t, p), o in sorted(self.next_offsets.items()))

    async def close(self) -> None:
        if self.consumer is not None:
            await self.consumer.stop()


def node_key(info: NodeInfo) -> str:
    return f"{info.node}@{info.ts!r}"


def floors(
    progress: dict[int, dict[MetaKey, int]],
    samples_partitions: set[int],
    keys: Iterable[MetaKey | TopicPartition],
) -> dict[MetaKey, int]:
    """Per metadata partition, the first offset some samples partition may still have to
    correct (0 for a samples partition that no owner recorded)."""
    out: dict[MetaKey, int] = {}
    for key in keys:
        meta: MetaKey = (key.topic, key.partition) if isinstance(key, TopicPartition) else key
        out[meta] = min(progress.get(p, {}).get(meta, 0) for p in samples_partitions or {0})
    return out


def _same_record(old: JobRecord | None, new: JobRecord) -> bool:
    """True when `new` tells nothing `old` did not (a repeated event, only a newer `ts`)."""
    return old is not None and dataclasses.replace(old, ts=0.0) == dataclasses.replace(new, ts=0.0)
