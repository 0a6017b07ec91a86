"""The cost path of the stream worker: samples in, priced facts out.

Runs inside the Faust app as a service. Samples are consumed with aiokafka directly and
offsets committed by hand, only once the facts they produced are stored: faust-streaming
0.15 can commit ahead of an unacknowledged message (its issue #606). Metadata (jobs, prices,
nodes) is read by every worker from the start of its topics, after the state stored in
ClickHouse, because Faust's changelog recovery is not reliable on the embedded broker
(ENGINES.md) and every worker needs all of it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener
from aiokafka.structs import ConsumerRecord, TopicPartition
from pydantic import ValidationError

from gpuledger.settings import Settings
from schema.messages import (
    CostFact,
    DeadLetter,
    GpuSample,
    JobEvent,
    NodeInfo,
    PriceEntry,
    SampleBatch,
)
from schema.pricebook import load_gpu_models
from schema.topics import Topics
from streams.cost import JobRecord
from streams.joiner import Held, Joiner
from streams.restate import Row, Scope, correction, fact_row, live_rows
from streams.sink import FactSink
from streams.state import MetadataState

log = logging.getLogger("gpuledger.worker")


class FactObserver(Protocol):
    """Something that follows the facts as they are stored (idle alerts, budgets).

    Called on the worker's loop; `on_facts` and `on_job` must be quick and never block:
    slow work (delivering alerts) belongs in `on_flush` or a task of the observer's own.
    """

    async def start(self, pipeline: CostPipeline) -> None: ...

    def on_facts(self, facts: Sequence[CostFact]) -> None: ...

    def on_job(self, job: JobRecord) -> None: ...

    async def on_flush(self) -> None: ...

    async def stop(self) -> None: ...


def validation_reason(exc: ValidationError) -> str:
    """One line per error: the field path, what is wrong, the value given."""
    parts = []
    for err in exc.errors(include_url=False):
        where = ".".join(str(p) for p in err["loc"]) or "message"
        parts.append(f"{where}: {err['msg']} (got {err.get('input')!r})")
    return "; ".join(parts)


@dataclass
class WorkerStats:
    messages: int = 0
    samples: int = 0
    facts: int = 0
    duplicates: int = 0
    deadletters: int = 0
    corrections: int = 0
    corrected_rows: int = 0
    started: float = field(default_factory=time.monotonic)

    def line(self) -> str:
        elapsed = max(time.monotonic() - self.started, 1e-9)
        return (
            f"{self.samples} samples ({self.samples / elapsed:,.0f}/s), {self.facts} facts, "
            f"{self.duplicates} duplicates dropped, {self.deadletters} dead letters, "
            f"{self.corrections} corrections ({self.corrected_rows} rows)"
        )


class CostPipeline:
    """Consumes samples and metadata, costs samples after their grace, stores facts."""

    def __init__(
        self,
        settings: Settings,
        sink_factory: Callable[[], FactSink],
        *,
        publish_facts: bool = True,
    ) -> None:
        self.settings = settings
        self.topics = Topics(settings.topic_prefix)
        self.sink_factory = sink_factory
        self.publish_facts = publish_facts
        self.state = MetadataState(load_gpu_models(), settings.idle_threshold)
        self.joiner = Joiner(settings.grace_s, settings.max_hold_wall_s)
        self.stats = WorkerStats()
        self.owned_gpus: set[str] = set()
        self._scopes: list[Scope] = []
        self._dirty_jobs: dict[str, JobRecord] = {}
        self._dirty_prices: list[PriceEntry] = []
        self._dirty_nodes: list[NodeInfo] = []
        self._letters: list[tuple[str, bytes | None, DeadLetter]] = []
        self._lock = asyncio.Lock()
        self._stopping = asyncio.Event()
        self._sink: FactSink | None = None
        self._samples: AIOKafkaConsumer | None = None
        self._meta: AIOKafkaConsumer | None = None
        self._producer: AIOKafkaProducer | None = None
        self.ready = asyncio.Event()
        self.stopped = asyncio.Event()
        self.observers: list[FactObserver] = []

    # -- lifecycle -------------------------------------------------------------------
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
        bootstrap = self.settings.bootstrap or "127.0.0.1:9092"
        self._producer = AIOKafkaProducer(
            bootstrap_servers=bootstrap, compression_type="lz4", linger_ms=20, acks="all"
        )
        await self._producer.start()
        await asyncio.to_thread(self._rebuild_from_store)
        self._meta = AIOKafkaConsumer(
            bootstrap_servers=bootstrap, enable_auto_commit=False, group_id=None
        )
        await self._meta.start()
        meta_topics = [self.topics.jobs, self.topics.prices, self.topics.nodes]
        partitions = [
            TopicPartition(t, p)
            for t in meta_topics
            for p in (self._meta.partitions_for_topic(t) or {0})
        ]
        self._meta.assign(partitions)
        await self._meta.seek_to_beginning(*partitions)
        await self._catch_up_metadata(partitions)
        self._samples = AIOKafkaConsumer(
            self.topics.samples,
            bootstrap_servers=bootstrap,
            # Not the Faust app's group: Faust's assignor protocol differs from aiokafka's.
            group_id=f"{self.settings.group_id}.samples",
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            session_timeout_ms=self.settings.session_timeout_ms,
            heartbeat_interval_ms=max(self.settings.session_timeout_ms // 6, 100),
            max_partition_fetch_bytes=8 * 1024 * 1024,
        )
        self._samples.subscribe([self.topics.samples], listener=_Rebalance(self))
        await self._samples.start()
        for observer in self.observers:
            await observer.start(self)
        self.ready.set()
        log.info("worker ready: %s", self.stats.line())

    def stop(self) -> None:
        self._stopping.set()

    async def _close(self) -> None:
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
        for event in sink.load_job_events():
            self.state.apply_job(event)
        for gpu, ts in sink.recent_sample_keys(self.joiner.dedup_horizon_s):
            self.joiner.remember(gpu, ts)
        log.info(
            "state rebuilt from the store: %d jobs, %d prices, %d recent samples",
            len(self.state.jobs),
            len(self.state._price_keys),
            self.joiner.watermark and len(self.joiner._seen),
        )

    async def _catch_up_metadata(self, partitions: list[TopicPartition]) -> None:
        """Read jobs, prices and nodes to their end before the first sample is costed."""
        assert self._meta is not None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            batches = await self._meta.getmany(timeout_ms=300, max_records=5000)
            for tp, records in batches.items():
                self._apply_metadata(tp, records)
            if not batches and all([await self._at_end(tp) for tp in partitions]):
                break
        # What the topics replayed is either already known or a real change: store it.
        self._scopes.clear()
        await self._store_metadata()

    async def _at_end(self, tp: TopicPartition) -> bool:
        assert self._meta is not None
        position = await self._meta.position(tp)
        # The high watermark of a fetch response is right on the embedded broker; its
        # end_offsets() is not (ENGINES.md), so only trust that for an empty partition.
        high = self._meta.highwater(tp)
        if high is None:
            ends = await self._meta.end_offsets([tp])
            return bool(position >= ends.get(tp, 0))
        return bool(position >= high)

    # -- metadata --------------------------------------------------------------------
    async def _consume_metadata(self) -> None:
        assert self._meta is not None
        while True:
            batches = await self._meta.getmany(timeout_ms=200, max_records=5000)
            for tp, records in batches.items():
                self._apply_metadata(tp, records)

    def _apply_metadata(self, tp: TopicPartition, records: Sequence[ConsumerRecord]) -> None:
        short = self.topics.short(tp.topic)
        for record in records:
            try:
                if short == "jobs":
                    event = JobEvent.model_validate_json(record.value)
                    changes = self.state.apply_job(event)
                    if changes:
                        job = self.state.jobs[event.job_id]
                        self._dirty_jobs[event.job_id] = job
                        for observer in self.observers:
                            observer.on_job(job)
                elif short == "prices":
                    entry = PriceEntry.model_validate_json(record.value)
                    changes = self.state.apply_price(entry)
                    if changes:
                        self._dirty_prices.append(entry)
                else:
                    info = NodeInfo.model_validate_json(record.value)
                    changes = self.state.apply_node(info)
                    if changes:
                        self._dirty_nodes.append(info)
            except ValidationError as exc:
                self._dead_letter(record, validation_reason(exc))
                continue
            self._scopes.extend(changes)

    # -- samples ---------------------------------------------------------------------
    async def _consume_samples(self) -> None:
        assert self._samples is not None
        while True:
            batches = await self._samples.getmany(timeout_ms=200, max_records=2000)
            now = time.monotonic()
            for records in batches.values():
                for record in records:
                    self._take_samples(record, now)

    def _take_samples(self, record: ConsumerRecord, now: float) -> None:
        self.stats.messages += 1
        try:
            batch = SampleBatch.model_validate_json(record.value)
        except ValidationError as exc:
            self._dead_letter(record, validation_reason(exc))
            self.joiner.offer([], record.partition, record.offset, now)
            return
        samples: list[GpuSample] = []
        for index, raw in enumerate(batch.samples):
            try:
                samples.append(GpuSample.model_validate(raw))
            except ValidationError as exc:
                self._dead_letter(record, validation_reason(exc), index=index, raw=raw)
        for sample in samples:
            self.owned_gpus.add(sample.gpu_uuid)
        dropped = self.joiner.offer(samples, record.partition, record.offset, now)
        self.stats.samples += len(samples) - len(dropped)
        self.stats.duplicates += len(dropped)

    def _dead_letter(
        self,
        record: ConsumerRecord,
        error: str,
        *,
        index: int | None = None,
        raw: Any = None,
    ) -> None:
        value = record.value if raw is None else orjson.dumps(raw)
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
            if time.monotonic() - last_log > 10:
                last_log = time.monotonic()
                log.info("%s", self.stats.line())

    async def flush(self, *, flush_all: bool = False) -> None:
        async with self._lock:
            due = self.joiner.due(time.monotonic(), flush_all=flush_all)
            await self._store_samples(due)
            await self._store_metadata()
            await self._apply_corrections()
            await self._send_letters()
            await self._commit()
            for observer in self.observers:
                await observer.on_flush()

    async def _store_samples(self, due: list[Held]) -> None:
        if not due:
            return
        due = await self._drop_stored(due)
        samples = [h.sample for h in due]
        facts = self.state.cost_all(samples)
        await self._retrying(self.sink.insert_raw, samples)
        await self._retrying(self.sink.insert_facts, facts)
        self.joiner.stored(due)
        self.stats.facts += len(facts)
        for observer in self.observers:
            observer.on_facts(facts)
        if self.publish_facts and facts:
            await self._publish_facts(facts)

    async def _drop_stored(self, due: list[Held]) -> list[Held]:
        """Samples too old for the in-memory dedup set are checked against the store."""
        old = [h for h in due if self.joiner.beyond_memory(h.sample.ts)]
        if not old:
            return due
        keys = [(h.sample.gpu_uuid, h.sample.ts) for h in old]
        stored = await self._retrying(self.sink.stored_sample_keys, keys)
        dup = [h for h in old if (h.sample.gpu_uuid, round(h.sample.ts * 1000)) in stored]
        if dup:
            self.joiner.stored(dup)
            self.stats.duplicates += len(dup)
            self.stats.samples -= len(dup)
        dup_ids = {id(h) for h in dup}
        return [h for h in due if id(h) not in dup_ids]

    async def _publish_facts(self, facts: list[CostFact]) -> None:
        assert self._producer is not None
        topic = self.topics.facts
        for fact in facts:
            await self._producer.send(
                topic, key=fact.gpu_uuid.encode(), value=fact.model_dump_json().encode()
            )

    async def _store_metadata(self) -> None:
        jobs, self._dirty_jobs = list(self._dirty_jobs.values()), {}
        prices, self._dirty_prices = self._dirty_prices, []
        nodes, self._dirty_nodes = self._dirty_nodes, []
        now = time.time()
        if jobs:
            await self._retrying(self.sink.upsert_jobs, jobs, now)
        if prices:
            await self._retrying(self.sink.upsert_prices, prices, now)
        if nodes:
            await self._retrying(self.sink.upsert_nodes, nodes)

    async def _apply_corrections(self) -> None:
        scopes, self._scopes = self._scopes, []
        for scope in dict.fromkeys(scopes):
            keys = await self._retrying(self.sink.keys_in_scope, scope)
            by_gpu: dict[str, list[int]] = {}
            for gpu, ts_ms in keys:
                if gpu in self.owned_gpus:
                    by_gpu.setdefault(gpu, []).append(ts_ms)
            for gpu, stamps in by_gpu.items():
                await self._correct(gpu, sorted(stamps))

    async def _correct(self, gpu: str, stamps: list[int], chunk: int = 5000) -> None:
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
            cancels: list[Row] = []
            restates: list[Row] = []
            # A sample whose raw copy is missing cannot be re-costed: leave its facts alone.
            for ts, rows in recosted_by_ts.items():
                c, r = correction(live_rows(stored_by_ts.get(ts, [])), rows)
                cancels += c
                restates += r
            if cancels or restates:
                token = f"correction:{uuid.uuid4()}"
                await self._retrying(self.sink.insert_rows, cancels, restates, token)
                self.stats.corrections += 1
                self.stats.corrected_rows += len(cancels) + len(restates)

    async def _send_letters(self) -> None:
        letters, self._letters = self._letters, []
        if not letters:
            return
        assert self._producer is not None
        for _topic, key, letter in letters:
            await self._producer.send(
                self.topics.deadletter, key=key, value=letter.model_dump_json().encode()
            )
        await self._producer.flush()
        await self._retrying(self.sink.insert_deadletters, [d for _, _, d in letters])

    async def _commit(self) -> None:
        if self._samples is None:
            return
        offsets = {
            TopicPartition(self.topics.samples, p): o
            for p, o in self.joiner.committable().items()
            if TopicPartition(self.topics.samples, p) in self._samples.assignment()
        }
        if offsets:
            try:
                await self._samples.commit(offsets)
            except Exception as exc:  # a rebalance in flight: the next flush commits
                log.warning("offset commit deferred: %s", exc)

    async def _retrying(self, func: Callable[..., Any], *args: Any) -> Any:
        """Store calls back off and retry: a store outage holds our place, loses nothing."""
        delay = 0.2
        while True:
            try:
                return await asyncio.to_thread(func, *args)
            except Exception as exc:
                if self._stopping.is_set() and delay > 5:
                    raise
                log.warning(
                    "store call %s failed (%s); retrying in %.1f s", func.__name__, exc, delay
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)


class _Rebalance(ConsumerRebalanceListener):
    def __init__(self, pipeline: CostPipeline) -> None:
        self.pipeline = pipeline

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        # Store what we hold of these partitions and commit before another worker takes them.
        await self.pipeline.flush(flush_all=True)
        self.pipeline.joiner.revoke({tp.partition for tp in revoked})

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        log.info("samples partitions assigned: %s", sorted(tp.partition for tp in assigned))
