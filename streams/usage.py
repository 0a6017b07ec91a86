"""Usage events (inference volume) on the samples' path: consumed with aiokafka in a consumer
group of their own, stored, and only then committed; each event stored once by its identity.

An event's identity is (job_id, source, ts to the millisecond), `UsageEvent` says why. A batch
of events is parsed (a bad message is dead-lettered with the reason, the good ones of the same
batch are stored), stripped of the identities already stored and of repeats within it, stored
with a deduplication token of its rows, and its offsets committed after its rows and its dead
letters are out. A worker killed between the insert and the commit re-reads the batch after
its restart and stores nothing of it again; so does the worker that takes its partitions over.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Container, Iterable
from typing import TYPE_CHECKING

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener
from aiokafka.errors import KafkaError
from aiokafka.structs import ConsumerRecord, TopicPartition
from pydantic import ValidationError

from gpuledger.ledger.timekeys import to_ms
from gpuledger.schema.messages import UsageEvent

if TYPE_CHECKING:
    from gpuledger.streams.pipeline import CostPipeline

log = logging.getLogger("gpuledger.worker")

UsageKey = tuple[str, str, int]  # job_id, source, ts in ms: what identifies a usage event
MAX_BATCH = 2000
LOG_EVERY_S = 10.0


def usage_key(event: UsageEvent) -> UsageKey:
    """The identity of a usage event, as the `usage` table stores it (ts to the ms)."""
    return event.job_id, event.source, to_ms(event.ts)


def new_events(events: Iterable[UsageEvent], stored: Container[UsageKey]) -> list[UsageEvent]:
    """The events to store: the first of each identity, none whose identity is stored."""
    seen: set[UsageKey] = set()
    out: list[UsageEvent] = []
    for event in events:
        key = usage_key(event)
        if key in stored or key in seen:
            continue
        seen.add(key)
        out.append(event)
    return out


class UsageConsumer:
    """The usage topic's consumer inside the worker: fetch, store, commit, in that order.

    It uses the pipeline's store calls (retried through a store outage: the events wait in
    Kafka meanwhile) and its dead-letter path.
    """

    def __init__(self, pipeline: CostPipeline, reason: Callable[[ValidationError], str]) -> None:
        self.pipeline = pipeline
        self.reason = reason
        self.stored = 0
        self.duplicates = 0
        self._consumer: AIOKafkaConsumer | None = None
        # Held from the parse to the commit: a revoke waits for the batch in hand.
        self._lock = asyncio.Lock()
        self._logged_at = time.monotonic()
        self._logged = (0, 0)

    async def start(self, bootstrap: str) -> None:
        config = self.pipeline.config
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap,
            group_id=f"{config.group_id}.usage",
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            session_timeout_ms=config.session_timeout_ms,
            heartbeat_interval_ms=config.heartbeat_interval_ms,
        )
        self._consumer.subscribe([self.pipeline.topics.usage], listener=_UsageRebalance(self))
        await self._consumer.start()

    async def stop(self) -> None:
        if self._consumer is not None:
            with contextlib.suppress(Exception):
                await self._consumer.stop()

    async def run(self) -> None:
        assert self._consumer is not None
        while True:
            try:
                batches = await self._consumer.getmany(timeout_ms=200, max_records=MAX_BATCH)
            except KafkaError as exc:  # the broker is away: the consumer reconnects
                log.warning("usage fetch failed (%s); retrying", exc)
                await asyncio.sleep(1.0)
                continue
            if batches:
                await self.store(batches)
            self._log_progress()

    async def store(self, batches: dict[TopicPartition, list[ConsumerRecord]]) -> None:
        """Store a fetch's events and commit its offsets (those still assigned to us)."""
        assert self._consumer is not None
        pipeline = self.pipeline
        async with self._lock:
            assigned = self._consumer.assignment()
            batches = {tp: records for tp, records in batches.items() if tp in assigned}
            if not batches:
                return
            events: list[UsageEvent] = []
            # The pipeline's dead-letter helper queues letters with the samples' ones; these
            # are taken back at once (no await in between) to be sent before this commit.
            pending = pipeline.letters.pending
            mark = len(pending)
            for records in batches.values():
                for record in records:
                    try:
                        events.append(UsageEvent.model_validate_json(record.value or b""))
                    except ValidationError as exc:
                        pipeline.letters.of_record(record, self.reason(exc))
            letters = pending[mark:]
            del pending[mark:]
            keys = sorted({usage_key(e) for e in events})
            stored = await pipeline.calls.run(pipeline.sink.stored_usage_keys, keys)
            fresh = new_events(events, stored)
            await pipeline.calls.run(pipeline.sink.insert_usage, fresh)
            self.stored += len(fresh)
            self.duplicates += len(events) - len(fresh)
            await pipeline.send_letters(letters)
            offsets = {tp: records[-1].offset + 1 for tp, records in batches.items()}
            try:
                await self._consumer.commit(offsets)
            except Exception as exc:  # a rebalance in flight: the next owner re-reads, harmlessly
                log.warning("usage offset commit deferred: %s", exc)

    async def wait_idle(self) -> None:
        """Return once no batch is being stored (a revoke waits for this)."""
        async with self._lock:
            return

    def _log_progress(self) -> None:
        now = time.monotonic()
        if now - self._logged_at < LOG_EVERY_S or (self.stored, self.duplicates) == self._logged:
            return
        self._logged_at = now
        self._logged = (self.stored, self.duplicates)
        log.info("usage: %d events stored, %d duplicates dropped", self.stored, self.duplicates)


class _UsageRebalance(ConsumerRebalanceListener):
    def __init__(self, usage: UsageConsumer) -> None:
        self.usage = usage

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        # The batch in hand is stored and committed before another worker reads these
        # partitions; the next batch skips them (they are no longer assigned).
        await self.usage.wait_idle()

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        log.info("usage partitions assigned: %s", sorted(tp.partition for tp in assigned))
