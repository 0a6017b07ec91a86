"""The cost path of the stream worker: samples in, priced facts out.

Runs inside the Faust app as a service. Samples are consumed with aiokafka directly and
offsets committed by hand, only once the facts they produced are stored: faust-streaming
0.15 can commit ahead of an unacknowledged message (a known bug of its). Usage events take
the same path beside them (streams/usage.py); metadata is read by streams/metadata.py, and the
corrections it calls for are made by streams/corrections.py, in the flush.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener
from aiokafka.errors import KafkaError
from aiokafka.structs import ConsumerRecord, TopicPartition
from pydantic import ValidationError

from gpuledger.ledger.cost import JobRecord
from gpuledger.ledger.facts import FactBatch, sample_of_row
from gpuledger.ledger.joiner import Held, Joiner
from gpuledger.ledger.state import MetadataState
from gpuledger.ledger.timekeys import sample_key
from gpuledger.schema.messages import GpuSample, SampleBatch
from gpuledger.schema.pricebook import load_gpu_models
from gpuledger.schema.topics import Topics
from gpuledger.streams.config import WorkerConfig
from gpuledger.streams.corrections import Corrections
from gpuledger.streams.deadletters import (
    DeadLetters,
    Letter,
    failure_reason,
    validation_reason,
)
from gpuledger.streams.decode import SampleDecoder
from gpuledger.streams.facts_feed import FACTS_BATCH_BYTES, send_facts
from gpuledger.streams.metadata import MetadataFeed, floors
from gpuledger.streams.observers import FactObserver
from gpuledger.streams.parts import WorkerParts
from gpuledger.streams.retries import StoreCalls
from gpuledger.streams.sink import FactSink
from gpuledger.streams.stats import WorkerStats
from gpuledger.streams.usage import UsageConsumer

log = logging.getLogger("gpuledger.worker")
_DECODER = SampleDecoder()

# Samples held (in their grace or due) above which consumption waits for a running flush.
CONSUME_AHEAD_SAMPLES = 20_000
# The scope log is cut to what some partition's owner may still have to redo this often.
LOG_PRUNE_EVERY_S = 60.0


class CostPipeline:
    """Consumes samples and metadata, costs samples after their grace, stores facts."""

    def __init__(
        self,
        config: WorkerConfig,
        sink_factory: Callable[[], FactSink],
        *,
        publish_facts: bool = True,
        max_held_samples: int = 200_000,
    ) -> None:
        self.config = config
        self.topics = Topics(config.topic_prefix)
        self.sink_factory = sink_factory
        self.publish_facts = publish_facts
        self.state = MetadataState(load_gpu_models(), config.idle_threshold, config.idle_basis)
        self.joiner = Joiner(config.grace_s, config.max_hold_wall_s)
        self.stats = WorkerStats()
        # A store outage must not fill memory: consumption pauses above this many held samples.
        self.max_held_samples = max_held_samples
        self.observers: list[FactObserver] = []
        self._stopping = asyncio.Event()
        self.calls = StoreCalls(self._stopping, self._position)
        self.letters = DeadLetters(self.stats, self.topics.samples, self.topics.deadletter)
        parts = WorkerParts(
            topics=self.topics,
            state=self.state,
            joiner=self.joiner,
            sink=lambda: self.sink,
            calls=self.calls,
            letters=self.letters,
            stats=self.stats,
            observers=self.observers,
        )
        self.metadata = MetadataFeed(parts)
        self.corrections = Corrections(parts, self.metadata)
        self._lock = asyncio.Lock()
        self._sink: FactSink | None = None
        self._samples: AIOKafkaConsumer | None = None
        self._producer: AIOKafkaProducer | None = None
        self.ready = asyncio.Event()
        self.stopped = asyncio.Event()
        self.usage = UsageConsumer(self, validation_reason)

    # -- what observers see (observers.WorkerPort) --------------------------------------
    @property
    def sink(self) -> FactSink:
        if self._sink is None:
            self._sink = self.sink_factory()
        return self._sink

    @property
    def store_client(self) -> Any:
        return self.sink.client

    @property
    def jobs(self) -> Mapping[str, JobRecord]:
        return self.state.jobs

    def holder(self, gpu_uuid: str, t: float) -> JobRecord | None:
        return self.state.holder(gpu_uuid, t)

    async def publish(self, topic: str, records: Sequence[tuple[bytes, bytes]]) -> None:
        if self._producer is None:
            return
        sends = [await self._producer.send(topic, key=k, value=v) for k, v in records]
        await asyncio.gather(*sends)

    async def run_with_retries(self, func: Callable[..., Any], *args: Any) -> Any:
        return await self.calls.run(func, *args)

    async def send_letters(self, letters: list[Letter]) -> None:
        """Dead letters to the topic and the table (those not sent before)."""
        await self.letters.send(letters, self._producer, self.sink, self.calls)

    @property
    def owned_gpus(self) -> set[str]:
        """The GPUs whose facts this worker corrects: those of its samples partitions."""
        return self.corrections.owned_gpus

    # -- lifecycle -------------------------------------------------------------------
    async def run(self) -> None:
        tasks: list[asyncio.Task[None]] = []
        try:
            await self._start()
            tasks = [
                asyncio.create_task(self._consume_samples(), name="samples"),
                asyncio.create_task(self.metadata.consume(), name="metadata"),
                asyncio.create_task(self._flush_loop(), name="flush"),
                asyncio.create_task(self.usage.run(), name="usage"),
            ]
            stopping = asyncio.create_task(self._stopping.wait())
            done, _ = await asyncio.wait([*tasks, stopping], return_when=asyncio.FIRST_COMPLETED)
            stopping.cancel()
            for task in done:
                if task is not stopping:
                    task.result()  # a loop that ended on its own failed: raise its error
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            try:
                if self.ready.is_set():
                    # SIGTERM: whatever is held is costed and stored before we go.
                    await self.flush(flush_all=True)
            finally:
                for observer in self.observers:
                    with contextlib.suppress(Exception):
                        await observer.stop()
                await self._close()
                self.stopped.set()

    async def _start(self) -> None:
        bootstrap = self.config.brokers
        compression = self.config.facts_compression
        self._producer = AIOKafkaProducer(
            bootstrap_servers=bootstrap,
            compression_type=None if compression == "none" else compression,
            linger_ms=20,
            acks="all",
            # The facts feed goes in batches this large (send_facts): 16 KiB batches, the
            # default, cost 14 µs a fact, one request and one compressed frame per 25 facts.
            max_batch_size=FACTS_BATCH_BYTES,
        )
        await self._producer.start()
        await asyncio.to_thread(self._rebuild_from_store)
        partitions = await self._open_metadata(bootstrap)
        await self.metadata.catch_up(partitions)
        self._samples = AIOKafkaConsumer(
            self.topics.samples,
            bootstrap_servers=bootstrap,
            # Not the Faust app's group: Faust's assignor protocol differs from aiokafka's.
            group_id=f"{self.config.group_id}.samples",
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            session_timeout_ms=self.config.session_timeout_ms,
            heartbeat_interval_ms=self.config.heartbeat_interval_ms,
            max_partition_fetch_bytes=8 * 1024 * 1024,
        )
        self._samples.subscribe([self.topics.samples], listener=_Rebalance(self))
        await self._samples.start()
        await self.usage.start(bootstrap)
        for observer in self.observers:
            await observer.start(self)
        self.ready.set()
        log.info("worker ready: %s", self.stats.line())

    async def _open_metadata(self, bootstrap: str) -> list[TopicPartition]:
        """Open the metadata consumer and learn how far back corrections may be redone."""
        partitions, samples_partitions = await self.metadata.open(bootstrap)
        corrections = self.corrections
        corrections.samples_partitions = samples_partitions
        self.metadata.log_floor = floors(
            corrections.stored_progress, corrections.samples_partitions, partitions
        )
        log.info(
            "corrections of %d samples partitions may be redone from metadata offsets %s",
            len(corrections.samples_partitions),
            {f"{t}[{p}]": o for (t, p), o in sorted(self.metadata.log_floor.items())},
        )
        return partitions

    def stop(self) -> None:
        self._stopping.set()

    async def _close(self) -> None:
        await self.usage.stop()
        closers: list[Callable[[], Awaitable[Any]]] = [self.metadata.close]
        if self._samples is not None:
            closers.insert(0, self._samples.stop)
        if self._producer is not None:
            closers.append(self._producer.stop)
        for close in closers:
            with contextlib.suppress(Exception):
                await close()

    def _rebuild_from_store(self) -> None:
        """The state after a restart: what the store holds of jobs, prices and nodes, who
        corrects which GPU and how far (samples costed before are learnt per partition, as
        partitions are assigned)."""
        sink = self.sink
        for entry in sink.load_prices():
            self.state.apply_price(entry)
        for node in sink.load_nodes():
            self.state.apply_node(node)
        for job in sink.load_jobs():
            self.state.restore_job(job)
        self.corrections.gpu_partition = sink.load_gpu_partitions()
        self.corrections.stored_progress = sink.load_progress()
        log.info(
            "state rebuilt from the store: %d jobs, %d prices, %d nodes",
            len(self.state.jobs),
            len(self.state._price_keys),
            len(self.state.nodes()),
        )

    # -- samples ---------------------------------------------------------------------
    async def _consume_samples(self) -> None:
        assert self._samples is not None
        _tune_gc()
        consumer = self._samples
        while True:
            self._backpressure(consumer)
            if self.corrections.taking_over & self.corrections.owned:
                # Fetched now, a backlog would be parked whole and costed in one flush after
                # the take-over: wait for it instead (the next flush does it).
                await asyncio.sleep(0.05)
                continue
            try:
                batches = await consumer.getmany(timeout_ms=200, max_records=2000)
            except KafkaError as exc:  # the broker is away: the consumer reconnects
                log.warning("samples fetch failed (%s); retrying", exc)
                await asyncio.sleep(1.0)
                continue
            now = time.monotonic()
            for records in batches.values():
                for record in records:
                    self._take_samples(record, now)
            # A backlog's fetches return without suspending: without this the flush task
            # never runs until the backlog is read, and every sample waits in memory.
            await asyncio.sleep(0)
            if self._lock.locked() and self.joiner.held_count >= CONSUME_AHEAD_SAMPLES:
                # A flush is storing and plenty waits for the next: let it finish rather than
                # share the GIL with it, which only makes the next flush larger and later.
                async with self._lock:
                    pass

    def _backpressure(self, consumer: AIOKafkaConsumer) -> None:
        """While the store is away, samples wait in Kafka, not in memory."""
        if self.joiner.held_count > self.max_held_samples:
            if not consumer.paused():
                log.warning(
                    "%d samples held: pausing consumption until the store catches up",
                    self.joiner.held_count,
                )
                consumer.pause(*consumer.assignment())
        elif consumer.paused() and self.joiner.held_count < self.max_held_samples // 2:
            consumer.resume(*consumer.paused())

    def _take_samples(self, record: ConsumerRecord, now: float) -> None:
        if record.partition in self.corrections.taking_over:
            self.corrections.parked.append(record)
            return
        self.stats.messages += 1
        try:
            self._offer_samples(record, now)
        except Exception as exc:  # whatever fails on one message costs that message only
            self.letters.of_record(record, failure_reason(exc))
            self.joiner.offer([], record.partition, record.offset, now)

    def _offer_samples(self, record: ConsumerRecord, now: float) -> None:
        # The fast decoder takes a message only when all of it is valid; pydantic decides
        # (and words the dead letters of) everything else.
        samples = _DECODER.decode(record.value)
        if samples is None:
            samples = self._validate_samples(record)
            if samples is None:
                self.joiner.offer([], record.partition, record.offset, now)
                return
        note = self.corrections.note_partition
        for sample in samples:
            note(sample.gpu_uuid, record.partition)
        dropped = self.joiner.offer(samples, record.partition, record.offset, now)
        self.stats.samples += len(samples) - len(dropped)
        self.stats.duplicates += len(dropped)

    def _validate_samples(self, record: ConsumerRecord) -> list[GpuSample] | None:
        """The pydantic path: the valid samples of a message, the others dead-lettered one by
        one; None (and the whole message dead-lettered) when it is no `SampleBatch`."""
        try:
            batch = SampleBatch.model_validate_json(record.value)
        except ValidationError as exc:
            self.letters.of_record(record, validation_reason(exc))
            return None
        samples: list[GpuSample] = []
        for index, raw in enumerate(batch.samples):
            try:
                samples.append(GpuSample.model_validate(raw))
            except ValidationError as exc:
                self.letters.of_record(record, validation_reason(exc), index=index, raw=raw)
        return samples

    # -- the flush: cost, store, correct, commit ---------------------------------------
    async def _flush_loop(self) -> None:
        last_log = time.monotonic()
        while True:
            await asyncio.sleep(0.2)
            await self.flush()
            if time.monotonic() - self.corrections.pruned_at > LOG_PRUNE_EVERY_S:
                found = set()
                if self._samples is not None:
                    found = set(self._samples.partitions_for_topic(self.topics.samples) or ())
                await self.corrections.prune_scope_log(found)
            if time.monotonic() - last_log > 10:
                last_log = time.monotonic()
                log.info("%s", self.stats.line())

    async def flush(self, *, flush_all: bool = False) -> None:
        async with self._lock:
            corrections = self.corrections
            await corrections.take_over(self._take_samples)
            due = self.joiner.due(time.monotonic(), flush_all=flush_all)
            await self._store_samples(due)
            # What the corrections below cover: the metadata applied up to here.
            scopes, meta_next = self.metadata.take_scopes()
            await corrections.apply(scopes, corrections.owned)
            await self.metadata.store()
            await corrections.record_progress(meta_next, corrections.owned, force=flush_all)
            # Dead letters and offsets together: an offset is committed only once the letters
            # of the messages before it are out.
            letters = self.letters.take()
            offsets = self.joiner.committable()
            await self.send_letters(letters)
            await self._commit(offsets)
            for observer in self.observers:
                await observer.on_flush()

    async def _store_samples(self, due: list[Held]) -> None:
        if not due:
            return
        due = await self._drop_stored(due)
        facts = self._cost(due)
        await self.corrections.store_gpu_partitions()
        refused: set[tuple[str, float]] = set()  # (GPU, ts) of the samples refused

        def refuse(held: Held, exc: Exception) -> None:
            key = (held.sample.gpu_uuid, held.sample.ts)
            if key not in refused:
                refused.add(key)
                self.letters.of_sample(held, exc)

        await self.calls.store_rows(
            self.sink.insert_raw, due, refuse, rows=lambda helds: [h.sample for h in helds]
        )
        if refused:
            facts = facts.without(refused)
        # A fact's sample is found only for a fact the store refuses (never on the hot path).
        held_of: dict[tuple[str, float], Held] = {}

        def refuse_fact(row: list[Any], exc: Exception) -> None:
            if not held_of:
                held_of.update(((h.sample.gpu_uuid, h.sample.ts), h) for h in due)
            refuse(held_of[sample_of_row(row)], exc)

        await self.calls.store_rows(self.sink.insert_facts, facts.rows, refuse_fact, rows=FactBatch)
        # Refused samples too: their dead letters go out before their offsets are committed.
        self.joiner.stored(due)
        stored = facts.without(refused) if refused else facts
        self.stats.facts += len(stored)
        samples = [h.sample for h in due]
        if refused:
            samples = [s for s in samples if (s.gpu_uuid, s.ts) not in refused]
        self._tell_observers(stored, samples)
        if self.publish_facts and stored:
            await self._publish_facts(stored)

    def _tell_observers(self, stored: FactBatch, samples: list[GpuSample]) -> None:
        records = stored.records() if self.observers else []
        for observer in self.observers:
            try:
                observer.on_facts(records)
                observer.on_samples(samples)
            except Exception:  # the facts are stored: an observer's failure stops nothing
                log.exception("%s failed on %d facts", type(observer).__name__, len(stored))

    async def _drop_stored(self, due: list[Held]) -> list[Held]:
        """Samples the in-memory dedup set cannot vouch for are checked against the store."""
        old = self.joiner.to_check(due)
        if not old:
            return due
        keys = [(h.sample.gpu_uuid, h.sample.ts) for h in old]
        stored = await self.calls.run(self.sink.stored_sample_keys, keys)
        dup = [h for h in old if sample_key(h.sample.gpu_uuid, h.sample.ts) in stored]
        if dup:
            self.joiner.stored(dup)
            self.stats.duplicates += len(dup)
            self.stats.samples -= len(dup)
        dup_ids = {id(h) for h in dup}
        return [h for h in due if id(h) not in dup_ids]

    async def _publish_facts(self, facts: FactBatch) -> None:
        """The facts topic is a live feed; the store is the record. A broker that is away
        costs the feed these facts (said in the log), never the worker its place."""
        assert self._producer is not None
        if not self.config.publish_facts:
            return
        try:
            await send_facts(self._producer, self.topics.facts, facts)
        except KafkaError as exc:
            log.warning("facts topic: %d facts not published (%s)", len(facts), exc)

    def _cost(self, due: list[Held]) -> FactBatch:
        """The due samples' facts; a sample the cost model fails on is dead-lettered."""
        try:
            return FactBatch(self.state.cost_rows([h.sample for h in due]))
        except Exception:  # find the samples at fault, one by one
            rows: list[list[Any]] = []
            for held in due:
                try:
                    rows += self.state.cost_rows((held.sample,))
                except Exception as exc:
                    self.letters.of_sample(held, exc)
            return FactBatch(rows)

    async def _commit(self, committable: dict[int, int]) -> None:
        if self._samples is None:
            return
        assigned = self._samples.assignment()
        offsets = {
            TopicPartition(self.topics.samples, p): o
            for p, o in committable.items()
            if TopicPartition(self.topics.samples, p) in assigned
        }
        if offsets:
            try:
                await self._samples.commit(offsets)
            except Exception as exc:  # a rebalance in flight: the next flush commits
                log.warning("offset commit deferred: %s", exc)

    def _position(self) -> str:
        """Where the worker stands: the first offsets not stored yet, per partition."""
        samples = ", ".join(
            f"{self.topics.samples}[{p}]@{o}" for p, o in sorted(self.joiner.committable().items())
        )
        meta = self.metadata.position()
        return f"waiting at {samples or 'no samples yet'}; metadata read to {meta or 'nothing'}"


_gc_tuned = False


def _tune_gc() -> None:
    """Once per process: what start-up built (modules, metadata) lives as long as the worker,
    so the collector stops passing over it, and collects young objects less often; a hot
    loop that allocates a few objects per sample spent about a fifth of its time in it."""
    global _gc_tuned
    if not _gc_tuned:
        _gc_tuned = True
        gc.freeze()
        gc.set_threshold(50_000, 20, 50)


class _Rebalance(ConsumerRebalanceListener):
    def __init__(self, pipeline: CostPipeline) -> None:
        self.pipeline = pipeline

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        # Store what we hold of these partitions, correct and commit before another worker
        # takes them: from here on they are its to correct.
        await self.pipeline.flush(flush_all=True)
        partitions = {tp.partition for tp in revoked}
        self.pipeline.joiner.revoke(partitions)
        self.pipeline.corrections.release(partitions)

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        partitions = {tp.partition for tp in assigned}
        self.pipeline.corrections.own(partitions)
        log.info("samples partitions assigned: %s", sorted(partitions))
