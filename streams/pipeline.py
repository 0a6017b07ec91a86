"""The cost path of the stream worker: samples in, priced facts out.

Runs inside the Faust app as a service. Samples are consumed with aiokafka directly and
offsets committed by hand, only once the facts they produced are stored: faust-streaming
0.15 can commit ahead of an unacknowledged message (its issue #606). Usage events take the
same path beside them (streams/usage.py). Metadata (jobs, prices, nodes) is read by every
worker from the start of its topics, after the state stored in ClickHouse, because Faust's
changelog recovery is not reliable on the embedded broker (ARCHITECTURE.md §5) and every worker
needs all of it.

Corrections (cancel and restate, ARCHITECTURE.md §3) of a GPU's facts are made by one worker only:
the one that owns the samples partition the GPU's samples arrive in (`gpu_partitions`), so
that two workers never cancel the same rows twice, and the worker that writes a GPU's facts
is the one that corrects them (its costing and its corrections see the metadata in the same
order). Each owner records, per samples partition, the metadata offsets up to which it has
made every correction (`correction_progress`); a worker that takes a partition over (after a
crash, a restart, a rebalance) redoes the corrections of the metadata after them. Redoing is
harmless: a correction re-costs from the raw sample and writes nothing when the stored rows
are already right, and its dedup token is a digest of the rows it read.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import gc
import logging
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener
from aiokafka.errors import KafkaError
from aiokafka.partitioner import DefaultPartitioner
from aiokafka.structs import ConsumerRecord, TopicPartition
from pydantic import ValidationError

from gpuledger.ledger.cost import JobRecord
from gpuledger.ledger.factrows import Row, fact_row
from gpuledger.ledger.joiner import Held, Joiner
from gpuledger.ledger.restate import Scope, correction, correction_token, live_rows
from gpuledger.ledger.state import MetadataState
from gpuledger.ledger.timekeys import sample_key
from gpuledger.schema.messages import (
    LABEL_NORMALISATIONS,
    CostFact,
    DeadLetter,
    GpuSample,
    JobEvent,
    NodeInfo,
    PriceEntry,
    SampleBatch,
)
from gpuledger.schema.pricebook import load_gpu_models
from gpuledger.schema.topics import Topics
from gpuledger.streams.config import WorkerConfig
from gpuledger.streams.decode import SampleDecoder, sample_payloads
from gpuledger.streams.sink import FactSink
from gpuledger.streams.store_errors import PermanentStoreError, is_permanent
from gpuledger.streams.usage import UsageConsumer

log = logging.getLogger("gpuledger.worker")
_DECODER = SampleDecoder()

MetaKey = tuple[str, int]  # a metadata topic and partition
# Samples held (in their grace or due) above which consumption waits for a running flush.
CONSUME_AHEAD_SAMPLES = 20_000
# Progress is written when it moved, at most this often (and always on a revoke or a stop):
# a crash makes the next owner redo at most these seconds of corrections, harmlessly.
PROGRESS_EVERY_S = 5.0
# The scope log is cut to what some partition's owner may still have to redo this often.
LOG_PRUNE_EVERY_S = 60.0
# A GPU whose partition no worker recorded (facts older than gpu_partitions) is corrected by
# the owner of this partition, so that exactly one worker does it.
LEGACY_OWNER_PARTITION = 0
# A dead letter's reason and a log line quote at most this much of a value given (the
# envelope keeps the bytes), and a reason is at most REASON_MAX_CHARS long.
QUOTE_CHARS = 120
REASON_MAX_CHARS = 2000
# A dead letter larger than this goes to the topic with its value cut (the broker refuses
# records over 1 MiB); the deadletters table keeps it whole.
LETTER_MAX_BYTES = 900 * 1024
# A worker that cannot store says so, with where it stands, at most this often.
STALL_REPORT_EVERY_S = 60.0


class FactObserver(Protocol):
    """Something that follows the facts as they are stored (idle alerts, budgets).

    Called on the worker's loop; `on_facts` and `on_job` must be quick and never block:
    slow work (delivering alerts) belongs in `on_flush` or a task of the observer's own.
    """

    async def start(self, pipeline: CostPipeline) -> None: ...

    def on_facts(self, facts: Sequence[CostFact]) -> None: ...

    def on_job(self, job: JobRecord) -> None: ...

    def on_corrected(self, gpu_uuids: set[str]) -> None:
        """These GPUs' stored facts were just cancelled and restated."""

    async def on_flush(self) -> None: ...

    async def stop(self) -> None: ...


def quote(value: object, limit: int = QUOTE_CHARS) -> str:
    """`repr(value)`, cut to `limit` characters (saying how long it was) when longer."""
    if isinstance(value, (bytes, str)) and len(value) > 4 * limit:
        text = repr(value[: 2 * limit])  # never the repr of a megabyte to keep 120 of it
    else:
        text = repr(value)
    if len(text) <= limit:
        return text
    size = f"{len(value):,}" if isinstance(value, (bytes, str)) else f"{len(text):,} as text"
    return f"{text[:limit]}… ({size} long)"


def validation_reason(exc: ValidationError) -> str:
    """One line per error: the field path, what is wrong, the value given (its start)."""
    parts = []
    for err in exc.errors(include_url=False):
        where = ".".join(str(p) for p in err["loc"]) or "message"
        parts.append(f"{where}: {err['msg']} (got {quote(err.get('input'))})")
    return bounded("; ".join(parts))


def failure_reason(exc: BaseException) -> str:
    """The reason of a dead letter for any failure: pydantic's words for a refusal, else
    the exception's type and (the start of) its message."""
    if isinstance(exc, ValidationError):
        return validation_reason(exc)
    if isinstance(exc, PermanentStoreError):
        return bounded(f"refused by the store: {exc}")
    return bounded(f"{type(exc).__name__}: {exc}")


def bounded(text: str, limit: int = REASON_MAX_CHARS) -> str:
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text):,} characters)"


@dataclass
class WorkerStats:
    messages: int = 0
    samples: int = 0
    facts: int = 0
    duplicates: int = 0
    deadletters: int = 0
    corrections: int = 0
    corrected_rows: int = 0
    refused_by_store: int = 0
    started: float = field(default_factory=time.monotonic)

    def line(self) -> str:
        elapsed = max(time.monotonic() - self.started, 1e-9)
        return (
            f"{self.samples} samples ({self.samples / elapsed:,.0f}/s), {self.facts} facts, "
            f"{self.duplicates} duplicates dropped, {self.deadletters} dead letters "
            f"({self.refused_by_store} refused by the store), "
            f"{self.corrections} corrections ({self.corrected_rows} rows), "
            f"{LABEL_NORMALISATIONS.count} label values normalised"
        )


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
        self.state = MetadataState(load_gpu_models(), config.idle_threshold)
        self.joiner = Joiner(config.grace_s, config.max_hold_wall_s)
        self.stats = WorkerStats()
        # A store outage must not fill memory: consumption pauses above this many held samples.
        self.max_held_samples = max_held_samples
        self._scopes: list[Scope] = []
        # Which worker corrects what (see the module's docstring).
        self._owned: set[int] = set()
        # Partitions just assigned: their records wait (`_parked`) until the worker knows
        # which of their samples the previous owner stored.
        self._taking_over: set[int] = set()
        self._parked: list[ConsumerRecord] = []
        self._gpu_partition: dict[str, int] = {}
        self._new_gpu_partitions: dict[str, int] = {}
        self._samples_partitions: set[int] = {0}
        self._meta_next: dict[MetaKey, int] = {}
        self._scope_log: list[tuple[MetaKey, int, tuple[Scope, ...]]] = []
        self._log_floor: dict[MetaKey, int] = {}
        self._stored_progress: dict[int, dict[MetaKey, int]] = {}
        self._progress_written: dict[int, dict[MetaKey, int]] = {}
        self._progress_at = 0.0
        self._pruned_at = time.monotonic()
        self._dirty_jobs: dict[str, JobRecord] = {}
        self._dirty_prices: list[PriceEntry] = []
        self._dirty_nodes: list[NodeInfo] = []
        self._letters: list[tuple[str, bytes | None, DeadLetter]] = []
        # The message each dirty job, price and node row came from: a row the store refuses
        # is dead-lettered as that message.
        self._sources: dict[tuple[str, str], ConsumerRecord] = {}
        self._stall_reported = 0.0
        self._lock = asyncio.Lock()
        self._stopping = asyncio.Event()
        self._sink: FactSink | None = None
        self._samples: AIOKafkaConsumer | None = None
        self._meta: AIOKafkaConsumer | None = None
        self._producer: AIOKafkaProducer | None = None
        self.ready = asyncio.Event()
        self.stopped = asyncio.Event()
        self.observers: list[FactObserver] = []
        self.usage = UsageConsumer(self, validation_reason)

    # -- lifecycle -------------------------------------------------------------------
    @property
    def owned_gpus(self) -> set[str]:
        """The GPUs whose facts this worker corrects: those of its samples partitions."""
        return {g for g, p in self._gpu_partition.items() if p in self._owned}

    @property
    def sink(self) -> FactSink:
        if self._sink is None:
            self._sink = self.sink_factory()
        return self._sink

    async def run(self) -> None:
        tasks: list[asyncio.Task[None]] = []
        try:
            await self._start()
            tasks = [
                asyncio.create_task(self._consume_samples(), name="samples"),
                asyncio.create_task(self._consume_metadata(), name="metadata"),
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
        self._producer = AIOKafkaProducer(
            bootstrap_servers=bootstrap,
            compression_type=(
                None if self.config.facts_compression == "none" else self.config.facts_compression
            ),
            linger_ms=20,
            acks="all",
            # The facts feed goes in batches this large (send_facts): 16 KiB batches, the
            # default, cost 14 µs a fact, one request and one compressed frame per 25 facts.
            max_batch_size=FACTS_BATCH_BYTES,
        )
        await self._producer.start()
        await asyncio.to_thread(self._rebuild_from_store)
        self._meta = AIOKafkaConsumer(
            bootstrap_servers=bootstrap, enable_auto_commit=False, group_id=None
        )
        await self._meta.start()
        # Read before assign(): the consumer then keeps metadata of its assigned topics only.
        self._samples_partitions = set(self._meta.partitions_for_topic(self.topics.samples) or {0})
        meta_topics = [self.topics.jobs, self.topics.prices, self.topics.nodes]
        partitions = [
            TopicPartition(t, p)
            for t in meta_topics
            for p in (self._meta.partitions_for_topic(t) or {0})
        ]
        self._meta.assign(partitions)
        await self._meta.seek_to_beginning(*partitions)
        self._log_floor = _floors(self._stored_progress, self._samples_partitions, partitions)
        log.info(
            "corrections of %d samples partitions may be redone from metadata offsets %s",
            len(self._samples_partitions),
            {f"{t}[{p}]": o for (t, p), o in sorted(self._log_floor.items())},
        )
        await self._catch_up_metadata(partitions)
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

    def stop(self) -> None:
        self._stopping.set()

    async def _close(self) -> None:
        await self.usage.stop()
        for client in (self._samples, self._meta, self._producer):
            if client is not None:
                with contextlib.suppress(Exception):
                    await client.stop()

    # -- state after a restart -------------------------------------------------------
    def _rebuild_from_store(self) -> None:
        sink = self.sink
        for entry in sink.load_prices():
            self.state.apply_price(entry)
        for node in sink.load_nodes():
            self.state.apply_node(node)
        for job in sink.load_jobs():
            self.state.restore_job(job)
        self._gpu_partition = sink.load_gpu_partitions()
        self._stored_progress = sink.load_progress()
        # The samples costed before are learnt per partition, as partitions are assigned.
        log.info(
            "state rebuilt from the store: %d jobs, %d prices, %d nodes",
            len(self.state.jobs),
            len(self.state._price_keys),
            len(self.state.nodes()),
        )

    async def _catch_up_metadata(self, partitions: list[TopicPartition]) -> None:
        """Read jobs, prices and nodes to their end before the first sample is costed."""
        assert self._meta is not None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            batches = await self._meta.getmany(timeout_ms=300, max_records=5000)
            for tp, records in batches.items():
                self._apply_metadata(tp, records, catching_up=True)
            if not batches and all([await self._at_end(tp) for tp in partitions]):
                break
        # What the topics replayed that the store did not know is stored; the corrections it
        # calls for wait in the scope log until this worker owns samples partitions.
        await self._store_metadata()

    async def _at_end(self, tp: TopicPartition) -> bool:
        assert self._meta is not None
        position = await self._meta.position(tp)
        # The high watermark of a fetch response is right on the embedded broker; its
        # end_offsets() is not (ARCHITECTURE.md §5), so only trust that for an empty partition.
        high = self._meta.highwater(tp)
        if high is None:
            ends = await self._meta.end_offsets([tp])
            return bool(position >= ends.get(tp, 0))
        return bool(position >= high)

    # -- metadata --------------------------------------------------------------------
    async def _consume_metadata(self) -> None:
        assert self._meta is not None
        while True:
            try:
                batches = await self._meta.getmany(timeout_ms=200, max_records=5000)
            except KafkaError as exc:  # the broker is away: the consumer reconnects
                log.warning("metadata fetch failed (%s); retrying", exc)
                await asyncio.sleep(1.0)
                continue
            for tp, records in batches.items():
                self._apply_metadata(tp, records)

    def _apply_metadata(
        self,
        tp: TopicPartition,
        records: Sequence[ConsumerRecord],
        *,
        catching_up: bool = False,
    ) -> None:
        short = self.topics.short(tp.topic)
        key: MetaKey = (tp.topic, tp.partition)
        floor = self._log_floor.get(key, 0)
        for record in records:
            self._meta_next[key] = record.offset + 1
            try:
                if short == "jobs":
                    event = JobEvent.model_validate_json(record.value)
                    before = self.state.jobs.get(event.job_id)
                    changes = self.state.apply_job(event)
                    job = self.state.jobs[event.job_id]
                    if changes or not _same_record(before, job):
                        # A job's record can move with no fact changing hands (the end of
                        # a job known only by its processes' labels): it is stored all the same.
                        self._dirty_jobs[event.job_id] = job
                        self._sources[("jobs", event.job_id)] = record
                        for observer in self.observers:
                            observer.on_job(job)
                    elif catching_up and record.offset >= floor:
                        # Known to the store, but maybe not corrected everywhere yet.
                        changes = self.state.job_recovery_scopes(event.job_id)
                elif short == "prices":
                    entry = PriceEntry.model_validate_json(record.value)
                    changes = self.state.apply_price(entry)
                    if changes:
                        self._dirty_prices.append(entry)
                        self._sources[("prices", entry.key)] = record
                    elif catching_up and record.offset >= floor:
                        changes = self.state.price_scopes(entry)
                else:
                    info = NodeInfo.model_validate_json(record.value)
                    changes = self.state.apply_node(info)
                    if changes:
                        self._dirty_nodes.append(info)
                        self._sources[("nodes", _node_key(info))] = record
                    elif catching_up and record.offset >= floor:
                        changes = self.state.node_scopes(info)
            except Exception as exc:  # whatever fails on one message costs that message only
                self._dead_letter(record, failure_reason(exc))
                continue
            if not changes:
                continue
            if not catching_up:
                self._scopes.extend(changes)
            if record.offset >= floor:
                self._scope_log.append((key, record.offset, tuple(changes)))

    # -- samples ---------------------------------------------------------------------
    async def _consume_samples(self) -> None:
        assert self._samples is not None
        _tune_gc()
        consumer = self._samples
        while True:
            # Backpressure: while the store is away, samples wait in Kafka, not in memory.
            if self.joiner.held_count > self.max_held_samples:
                if not consumer.paused():
                    log.warning(
                        "%d samples held: pausing consumption until the store catches up",
                        self.joiner.held_count,
                    )
                    consumer.pause(*consumer.assignment())
            elif consumer.paused() and self.joiner.held_count < self.max_held_samples // 2:
                consumer.resume(*consumer.paused())
            if self._taking_over & self._owned:
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

    def _take_samples(self, record: ConsumerRecord, now: float) -> None:
        if record.partition in self._taking_over:
            self._parked.append(record)
            return
        self.stats.messages += 1
        try:
            self._offer_samples(record, now)
        except Exception as exc:  # whatever fails on one message costs that message only
            self._dead_letter(record, failure_reason(exc))
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
        for sample in samples:
            if self._gpu_partition.get(sample.gpu_uuid) != record.partition:
                self._gpu_partition[sample.gpu_uuid] = record.partition
                self._new_gpu_partitions[sample.gpu_uuid] = record.partition
        dropped = self.joiner.offer(samples, record.partition, record.offset, now)
        self.stats.samples += len(samples) - len(dropped)
        self.stats.duplicates += len(dropped)

    def _validate_samples(self, record: ConsumerRecord) -> list[GpuSample] | None:
        """The pydantic path: the valid samples of a message, the others dead-lettered one by
        one; None (and the whole message dead-lettered) when it is no `SampleBatch`."""
        try:
            batch = SampleBatch.model_validate_json(record.value)
        except ValidationError as exc:
            self._dead_letter(record, validation_reason(exc))
            return None
        samples: list[GpuSample] = []
        for index, raw in enumerate(batch.samples):
            try:
                samples.append(GpuSample.model_validate(raw))
            except ValidationError as exc:
                self._dead_letter(record, validation_reason(exc), index=index, raw=raw)
        return samples

    def _dead_letter(
        self,
        record: ConsumerRecord,
        error: str,
        *,
        index: int | None = None,
        raw: Any = None,
    ) -> None:
        value = record.value
        if raw is not None:
            # A value orjson cannot write (an int past 64 bits) keeps its message's bytes.
            with contextlib.suppress(TypeError, orjson.JSONEncodeError):
                value = orjson.dumps(raw)
        error = bounded(error)
        letter = DeadLetter(
            value_b64=base64.b64encode(value or b"").decode(),
            error=error,
            topic=record.topic,
            partition=record.partition,
            offset=record.offset,
            ts=time.time(),
            index=index,
        )
        self._letters.append((record.topic, record.key, letter))
        self.stats.deadletters += 1
        log.warning(
            "dead letter from %s[%d]@%d%s: %s",
            record.topic,
            record.partition,
            record.offset,
            "" if index is None else f" sample {index}",
            error,
        )

    # -- the flush: cost, store, correct, commit ---------------------------------------
    async def _flush_loop(self) -> None:
        last_log = time.monotonic()
        while True:
            await asyncio.sleep(0.2)
            await self.flush()
            if time.monotonic() - self._pruned_at > LOG_PRUNE_EVERY_S:
                await self._prune_scope_log()
            if time.monotonic() - last_log > 10:
                last_log = time.monotonic()
                log.info("%s", self.stats.line())

    async def flush(self, *, flush_all: bool = False) -> None:
        async with self._lock:
            await self._take_over()
            due = self.joiner.due(time.monotonic(), flush_all=flush_all)
            await self._store_samples(due)
            # What the corrections below cover: the metadata applied up to here.
            scopes, self._scopes = self._scopes, []
            meta_next = dict(self._meta_next)
            await self._apply_corrections(scopes, self._owned)
            await self._store_metadata()
            await self._record_progress(meta_next, self._owned, force=flush_all)
            # Dead letters and offsets together: an offset is committed only once the letters
            # of the messages before it are out.
            letters, self._letters = self._letters, []
            offsets = self.joiner.committable()
            await self._send_letters(letters)
            await self._commit(offsets)
            for observer in self.observers:
                await observer.on_flush()

    async def _store_samples(self, due: list[Held]) -> None:
        if not due:
            return
        due = await self._drop_stored(due)
        facts = self._cost(due)
        if self._new_gpu_partitions:
            # Before the facts: whoever scans the facts learns who corrects them.
            pairs = list(self._new_gpu_partitions.items())
            await self._retrying(self.sink.upsert_gpu_partitions, pairs, time.time())
            for gpu, partition in pairs:
                if self._new_gpu_partitions.get(gpu) == partition:
                    del self._new_gpu_partitions[gpu]
        refused: set[tuple[str, float]] = set()  # (GPU, ts) of the samples refused

        def refuse(held: Held, exc: Exception) -> None:
            key = (held.sample.gpu_uuid, held.sample.ts)
            if key not in refused:
                refused.add(key)
                self._refuse_held(held, exc)

        await self._store_rows(
            self.sink.insert_raw, due, refuse, rows=lambda helds: [h.sample for h in helds]
        )
        if refused:
            facts = [f for f in facts if (f.gpu_uuid, f.ts) not in refused]
        # A fact's sample is found only for a fact the store refuses (never on the hot path).
        held_of: dict[tuple[str, float], Held] = {}

        def refuse_fact(fact: CostFact, exc: Exception) -> None:
            if not held_of:
                held_of.update(((h.sample.gpu_uuid, h.sample.ts), h) for h in due)
            refuse(held_of[(fact.gpu_uuid, fact.ts)], exc)

        await self._store_rows(self.sink.insert_facts, facts, refuse_fact)
        # Refused samples too: their dead letters go out before their offsets are committed.
        self.joiner.stored(due)
        stored = [f for f in facts if (f.gpu_uuid, f.ts) not in refused] if refused else facts
        self.stats.facts += len(stored)
        for observer in self.observers:
            try:
                observer.on_facts(stored)
            except Exception:  # the facts are stored: an observer's failure stops nothing
                log.exception("%s failed on %d facts", type(observer).__name__, len(stored))
        if self.publish_facts and stored:
            await self._publish_facts(stored)

    async def _drop_stored(self, due: list[Held]) -> list[Held]:
        """Samples too old for the in-memory dedup set are checked against the store."""
        old = [h for h in due if self.joiner.beyond_memory(h.sample.ts)]
        if not old:
            return due
        keys = [(h.sample.gpu_uuid, h.sample.ts) for h in old]
        stored = await self._retrying(self.sink.stored_sample_keys, keys)
        dup = [h for h in old if sample_key(h.sample.gpu_uuid, h.sample.ts) in stored]
        if dup:
            self.joiner.stored(dup)
            self.stats.duplicates += len(dup)
            self.stats.samples -= len(dup)
        dup_ids = {id(h) for h in dup}
        return [h for h in due if id(h) not in dup_ids]

    async def _publish_facts(self, facts: list[CostFact]) -> None:
        """The facts topic is a live feed; the store is the record. A broker that is away
        costs the feed these facts (said in the log), never the worker its place."""
        assert self._producer is not None
        if not self.config.publish_facts:
            return
        try:
            await send_facts(self._producer, self.topics.facts, facts)
        except KafkaError as exc:
            log.warning("facts topic: %d facts not published (%s)", len(facts), exc)

    async def _store_metadata(self) -> None:
        jobs, self._dirty_jobs = list(self._dirty_jobs.values()), {}
        prices, self._dirty_prices = self._dirty_prices, []
        nodes, self._dirty_nodes = self._dirty_nodes, []
        sources, self._sources = self._sources, {}
        now = time.time()

        def refuse(kind: str, key: str, exc: Exception) -> None:
            self.stats.refused_by_store += 1
            record = sources.get((kind, key))
            if record is None:  # a row of the state rebuilt from the store: no message
                log.error("the store refuses %s %s: %s", kind, quote(key), failure_reason(exc))
            else:
                self._dead_letter(record, failure_reason(exc))

        if jobs:
            await self._store_rows(
                self.sink.upsert_jobs, jobs, lambda j, exc: refuse("jobs", j.job_id, exc)
            )
        if prices:
            await self._store_rows(
                self.sink.upsert_prices, prices, lambda e, exc: refuse("prices", e.key, exc), now
            )
        if nodes:
            await self._store_rows(
                self.sink.upsert_nodes, nodes, lambda n, exc: refuse("nodes", _node_key(n), exc)
            )

    def _cost(self, due: list[Held]) -> list[CostFact]:
        """The due samples' facts; a sample the cost model fails on is dead-lettered."""
        try:
            return self.state.cost_all([h.sample for h in due])
        except Exception:  # find the samples at fault, one by one
            facts: list[CostFact] = []
            for held in due:
                try:
                    facts += self.state.cost_all((held.sample,))
                except Exception as exc:
                    self._refuse_held(held, exc)
            return facts

    def _refuse_held(self, held: Held, exc: Exception) -> None:
        """Dead-letter one sample that cannot be stored or costed (its raw JSON as value)."""
        if isinstance(exc, PermanentStoreError):
            self.stats.refused_by_store += 1
        sample = held.sample
        (payload,) = sample_payloads([sample])
        letter = DeadLetter(
            value_b64=base64.b64encode(payload).decode(),
            error=bounded(
                f"sample of {quote(sample.gpu_uuid)} at {sample.ts!r}: {failure_reason(exc)}"
            ),
            topic=self.topics.samples,
            partition=held.partition,
            offset=held.offset,
            ts=time.time(),
        )
        self._letters.append((letter.topic, sample.gpu_uuid.encode(), letter))
        self.stats.deadletters += 1
        log.warning(
            "dead letter from %s[%d]@%d: %s",
            letter.topic,
            held.partition,
            held.offset,
            letter.error,
        )

    async def _store_rows(
        self,
        func: Callable[..., Any],
        items: Sequence[Any],
        refuse: Callable[[Any, Exception], None],
        *extra: Any,
        rows: Callable[[Sequence[Any]], Sequence[Any]] | None = None,
    ) -> None:
        """`func(rows(items), *extra)`, retried while the store fails transiently. A
        permanent failure splits the batch in halves until the items the store refuses
        are found: each goes to `refuse`, the rest are stored."""
        if not items:
            return
        try:
            await self._retrying(func, rows(items) if rows else items, *extra, permanent=True)
        except PermanentStoreError as exc:
            if len(items) == 1:
                refuse(items[0], exc)
                return
            half = len(items) // 2
            log.warning("the store refuses a batch of %d (%s): splitting it", len(items), exc)
            await self._store_rows(func, items[:half], refuse, *extra, rows=rows)
            await self._store_rows(func, items[half:], refuse, *extra, rows=rows)

    # -- corrections -------------------------------------------------------------------
    def _own(self, partitions: set[int]) -> None:
        self._owned |= partitions
        self._taking_over |= partitions

    def _release(self, partitions: set[int]) -> None:
        self._owned -= partitions
        self._taking_over -= partitions
        # Not read for us any more: the next owner reads them from the committed offset.
        self._parked = [r for r in self._parked if r.partition not in partitions]
        for partition in partitions:
            self._progress_written.pop(partition, None)

    async def _take_over(self) -> None:
        """Make newly assigned partitions ours: learn which of their samples are stored
        (a sample costed by the previous owner is a duplicate here too), redo the corrections
        the previous owner may have left undone, then cost their records."""
        partitions = self._taking_over & self._owned
        if not partitions:
            return
        meta_next = dict(self._meta_next)
        keys = await self._retrying(
            self.sink.recent_sample_keys,
            self.joiner.dedup_horizon_s,
            sorted(partitions),
            LEGACY_OWNER_PARTITION in partitions,
        )
        for gpu, ts in keys:
            self.joiner.remember(gpu, ts)
        progress = await self._retrying(self.sink.load_progress)
        scopes: list[Scope] = []
        for partition in partitions:
            done = progress.get(partition, {})
            for key, offset, logged in self._scope_log:
                if offset >= done.get(key, 0):
                    scopes.extend(logged)
        log.info(
            "taking over samples partitions %s: %d samples stored before, %d corrections to redo",
            sorted(partitions),
            len(keys),
            len(set(scopes)),
        )
        await self._apply_corrections(scopes, partitions)
        await self._record_progress(meta_next, partitions, force=True)
        self._taking_over -= partitions
        parked = [r for r in self._parked if r.partition in partitions]
        self._parked = [r for r in self._parked if r.partition not in partitions]
        now = time.monotonic()
        for record in parked:
            self._take_samples(record, now)

    async def _apply_corrections(self, scopes: list[Scope], partitions: set[int]) -> None:
        if not scopes or not partitions:
            return
        stamps_by_gpu: dict[str, set[int]] = defaultdict(set)
        for scope in dict.fromkeys(scopes):
            for gpu, ts_ms in await self._retrying(self.sink.keys_in_scope, scope):
                stamps_by_gpu[gpu].add(ts_ms)
        owners = await self._partitions_of(list(stamps_by_gpu))
        mine = {
            gpu: sorted(stamps)
            for gpu, stamps in stamps_by_gpu.items()
            if owners.get(gpu, LEGACY_OWNER_PARTITION) in partitions
        }
        await self._correct(mine)

    async def _partitions_of(self, gpus: list[str]) -> dict[str, int]:
        unknown = [g for g in gpus if g not in self._gpu_partition]
        if unknown:
            found = await self._retrying(self.sink.load_gpu_partitions, unknown)
            self._gpu_partition.update(found)
        return {g: self._gpu_partition[g] for g in gpus if g in self._gpu_partition}

    async def _correct(
        self, stamps_by_gpu: dict[str, list[int]], chunk: int = 5000, batch_rows: int = 50_000
    ) -> None:
        cancels: list[Row] = []
        restates: list[Row] = []
        histories: list[tuple[str, list[tuple[int, Row]]]] = []
        corrected: set[str] = set()
        for gpu, stamps in stamps_by_gpu.items():
            for i in range(0, len(stamps), chunk):
                part = stamps[i : i + chunk]
                samples = await self._retrying(self.sink.raw_samples, gpu, part)
                stored = await self._retrying(self.sink.stored_rows, gpu, part)
                stored_by_ts: dict[object, list[tuple[int, Row]]] = defaultdict(list)
                for sign, row in stored:
                    stored_by_ts[row[0]].append((sign, row))
                recosted_by_ts: dict[object, list[Row]] = defaultdict(list)
                for fact in self.state.cost_all(samples):
                    row = fact_row(fact)
                    recosted_by_ts[row[0]].append(row)
                found = 0
                # A sample whose raw copy is missing cannot be re-costed: its facts stay.
                for ts, rows in recosted_by_ts.items():
                    c, r = correction(live_rows(stored_by_ts.get(ts, [])), rows)
                    cancels += c
                    restates += r
                    found += len(c) + len(r)
                if found:
                    histories.append((gpu, stored))
                    corrected.add(gpu)
                if len(cancels) + len(restates) >= batch_rows:
                    await self._insert_correction(cancels, restates, histories)
                    cancels, restates, histories = [], [], []
        await self._insert_correction(cancels, restates, histories)
        if corrected:
            for observer in self.observers:
                observer.on_corrected(corrected)

    async def _insert_correction(
        self,
        cancels: list[Row],
        restates: list[Row],
        histories: list[tuple[str, list[tuple[int, Row]]]],
    ) -> None:
        if not cancels and not restates:
            return
        token = correction_token(histories)
        try:
            await self._retrying(self.sink.insert_rows, cancels, restates, token, permanent=True)
        except PermanentStoreError as exc:
            # Rows re-costed from stored samples: a refusal here is the store's, not a
            # message's; the facts stay as they were, and the worker goes on.
            log.error(
                "the store refuses a correction of %d rows, which is left undone: %s",
                len(cancels) + len(restates),
                exc,
            )
            return
        self.stats.corrections += 1
        self.stats.corrected_rows += len(cancels) + len(restates)

    async def _record_progress(
        self, meta_next: dict[MetaKey, int], partitions: set[int], *, force: bool
    ) -> None:
        rows = [
            (partition, topic, meta_partition, offset)
            for partition in sorted(partitions)
            for (topic, meta_partition), offset in meta_next.items()
            if self._progress_written.get(partition, {}).get((topic, meta_partition)) != offset
        ]
        if not rows or (not force and time.monotonic() - self._progress_at < PROGRESS_EVERY_S):
            return
        await self._retrying(self.sink.record_progress, rows, time.time())
        self._progress_at = time.monotonic()
        for partition, topic, meta_partition, offset in rows:
            self._progress_written.setdefault(partition, {})[(topic, meta_partition)] = offset

    async def _prune_scope_log(self) -> None:
        """Forget the scopes that every samples partition's owner has corrected."""
        self._pruned_at = time.monotonic()
        progress = await self._retrying(self.sink.load_progress)
        if self._samples is not None:  # partitions may have been added to the topic
            found = self._samples.partitions_for_topic(self.topics.samples)
            self._samples_partitions |= set(found or ())
        keys = {key for key, _, _ in self._scope_log}
        floors = _floors(progress, self._samples_partitions, keys)
        self._scope_log = [e for e in self._scope_log if e[1] >= floors.get(e[0], 0)]

    # -- dead letters and offsets --------------------------------------------------------
    async def _send_letters(self, letters: list[tuple[str, bytes | None, DeadLetter]]) -> None:
        if not letters:
            return
        assert self._producer is not None
        # A message replayed after a crash was maybe dead-lettered already: once is enough.
        known = await self._retrying(self.sink.stored_deadletter_keys, [d for _, _, d in letters])
        letters = [x for x in letters if _letter_key(x[2]) not in known]
        if not letters:
            return
        pending = letters
        delay = 0.5
        while pending:
            # Delivery is awaited: a letter the broker did not take is sent again, never lost.
            outcomes: list[Any] = []
            for _topic, key, letter in pending:
                try:
                    outcomes.append(
                        await self._producer.send(
                            self.topics.deadletter, key=key, value=_letter_value(letter)
                        )
                    )
                except KafkaError as exc:
                    outcomes.append(exc)
            results = await asyncio.gather(
                *(o for o in outcomes if isinstance(o, asyncio.Future)), return_exceptions=True
            )
            delivered = iter(results)
            failed = [
                x
                for x, o in zip(pending, outcomes, strict=True)
                if not isinstance(o, asyncio.Future) or isinstance(next(delivered), Exception)
            ]
            if failed:
                log.warning(
                    "%d dead letters not accepted by the broker; retrying in %.1f s",
                    len(failed),
                    delay,
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)
            pending = failed
        await self._retrying(self.sink.insert_deadletters, [d for _, _, d in letters])

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

    async def _retrying(self, func: Callable[..., Any], *args: Any, permanent: bool = False) -> Any:
        """Store calls back off and retry: a store outage holds our place, loses nothing.

        `permanent`: a failure no retry cures (`is_permanent`) raises `PermanentStoreError`
        at once, for the caller to find the rows at fault; otherwise it is retried too. A
        call that keeps failing says so once a minute, with where the worker stands.
        """
        delay = 0.2
        failing_since: float | None = None
        while True:
            try:
                return await asyncio.to_thread(func, *args)
            except Exception as exc:
                if permanent and is_permanent(exc):
                    raise PermanentStoreError(exc) from exc
                if self._stopping.is_set() and delay > 5:
                    raise
                now = time.monotonic()
                failing_since = failing_since or now
                log.warning(
                    "store call %s failed (%s); retrying in %.1f s",
                    func.__name__,
                    bounded(str(exc), QUOTE_CHARS * 4),
                    delay,
                )
                if now - self._stall_reported >= STALL_REPORT_EVERY_S:
                    self._stall_reported = now
                    log.error(
                        "worker stalled for %.0f s: store call %s keeps failing; %s",
                        now - failing_since,
                        func.__name__,
                        self._position(),
                    )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)

    def _position(self) -> str:
        """Where the worker stands: the first offsets not stored yet, per partition."""
        samples = ", ".join(
            f"{self.topics.samples}[{p}]@{o}" for p, o in sorted(self.joiner.committable().items())
        )
        meta = ", ".join(f"{t}[{p}]@{o}" for (t, p), o in sorted(self._meta_next.items()))
        return f"waiting at {samples or 'no samples yet'}; metadata read to {meta or 'nothing'}"


# -- the facts topic ----------------------------------------------------------------------
_partitions_of_keys: dict[tuple[bytes, int], int] = {}


FACTS_BATCH_BYTES = 512 * 1024  # under the broker's default 1 MiB message limit
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


def _partition_for(key: bytes, partitions: list[int]) -> int:
    """The partition the producer's default partitioner gives `key` (remembered per GPU)."""
    found = _partitions_of_keys.get((key, len(partitions)))
    if found is None:
        found = DefaultPartitioner()(key, partitions, partitions)
        if len(_partitions_of_keys) < 1_000_000:
            _partitions_of_keys[(key, len(partitions))] = found
    return found


def _log_undelivered(future: asyncio.Future[Any]) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.warning("facts topic: a batch of facts was not delivered (%s)", future.exception())


async def send_facts(producer: AIOKafkaProducer, topic: str, facts: Sequence[CostFact]) -> None:
    """Every fact as one record of the facts topic (ARCHITECTURE.md §2: key = GPU UUID, value = the
    `CostFact` JSON), appended to one batch per partition and handed to the producer without
    waiting for the broker: a `send()` awaited per record cost more than costing the fact."""
    partitions = sorted(await producer.partitions_for(topic))
    batches: dict[int, Any] = {}
    for fact in facts:
        key = fact.gpu_uuid.encode()
        partition = _partition_for(key, partitions)
        batch = batches.get(partition)
        if batch is None:
            batch = batches[partition] = producer.create_batch()
        # A fact's __dict__ is its fields in the model's order: the JSON pydantic writes.
        value = orjson.dumps(fact.__dict__)
        if batch.append(key=key, value=value, timestamp=None) is None:  # full: send it
            sent = await producer.send_batch(batch, topic, partition=partition)
            sent.add_done_callback(_log_undelivered)
            batch = batches[partition] = producer.create_batch()
            batch.append(key=key, value=value, timestamp=None)
    for partition, batch in batches.items():
        sent = await producer.send_batch(batch, topic, partition=partition)
        sent.add_done_callback(_log_undelivered)


class _Rebalance(ConsumerRebalanceListener):
    def __init__(self, pipeline: CostPipeline) -> None:
        self.pipeline = pipeline

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        # Store what we hold of these partitions, correct and commit before another worker
        # takes them: from here on they are its to correct.
        await self.pipeline.flush(flush_all=True)
        partitions = {tp.partition for tp in revoked}
        self.pipeline.joiner.revoke(partitions)
        self.pipeline._release(partitions)

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        partitions = {tp.partition for tp in assigned}
        self.pipeline._own(partitions)
        log.info("samples partitions assigned: %s", sorted(partitions))


def _letter_key(letter: DeadLetter) -> tuple[str, int, int, int | None]:
    return letter.topic, letter.partition, letter.offset, letter.index


def _letter_value(letter: DeadLetter) -> bytes:
    """The letter's JSON for the topic: its value cut to fit a record when too large (the
    deadletters table keeps it whole)."""
    value = letter.model_dump_json().encode()
    if len(value) <= LETTER_MAX_BYTES:
        return value
    keep = LETTER_MAX_BYTES // 2 // 4 * 4  # whole base64 quanta
    size = len(letter.value_b64) * 3 // 4
    cut = letter.model_copy(
        update={
            "value_b64": letter.value_b64[:keep],
            "error": f"{letter.error} [value cut to its first {keep * 3 // 4:,} of about "
            f"{size:,} bytes here; the deadletters table keeps it whole]",
        }
    )
    return cut.model_dump_json().encode()


def _node_key(info: NodeInfo) -> str:
    return f"{info.node}@{info.ts!r}"


def _floors(
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
