"""Corrections (cancel and restate, ARCHITECTURE.md §3) of stored facts, and who makes them.

A GPU's facts are corrected by one worker only: the one that owns the samples partition the
GPU's samples arrive in (`gpu_partitions`), so that two workers never cancel the same rows
twice, and the worker that writes a GPU's facts is the one that corrects them (its costing
and its corrections see the metadata in the same order). Each owner records, per samples
partition, the metadata offsets up to which it has made every correction
(`correction_progress`); a worker that takes a partition over (after a crash, a restart, a
rebalance) redoes the corrections of the metadata after them. Redoing is harmless: a
correction re-costs from the raw sample and writes nothing when the stored rows are already
right, and its dedup token is a digest of the rows it read.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import astuple
from typing import TYPE_CHECKING, Any

from aiokafka.structs import ConsumerRecord

from gpuledger.ledger.factrows import VALUE_COLUMNS, Row, fact_row
from gpuledger.ledger.reprice import (
    PriceKey,
    PriceSpan,
    RepriceChunk,
    price_spans,
    reprice_chunks,
    reprice_token,
    retag_token,
)
from gpuledger.ledger.restate import Scope, correction, correction_token, live_rows
from gpuledger.ledger.timekeys import iso_utc
from gpuledger.streams.metadata import MetadataFeed, MetaKey, floors
from gpuledger.streams.store_errors import PermanentStoreError

if TYPE_CHECKING:
    from gpuledger.streams.parts import WorkerParts

log = logging.getLogger("gpuledger.worker")

# Progress is written when it moved, at most this often (and always on a revoke or a stop):
# a crash makes the next owner redo at most these seconds of corrections, harmlessly.
PROGRESS_EVERY_S = 5.0
# A GPU whose partition no worker recorded (facts older than gpu_partitions) is corrected by
# the owner of this partition, so that exactly one worker does it.
LEGACY_OWNER_PARTITION = 0
_GPU_AT = VALUE_COLUMNS.index("gpu_uuid")
# A sink's method that writes to the store, and its arguments.
Statement = tuple[Callable[..., None], tuple[Any, ...]]


class Corrections:
    """Which samples partitions this worker owns (and is taking over), which partition each
    GPU's samples arrive in, and the corrections and progress of the partitions it owns."""

    def __init__(self, parts: WorkerParts, metadata: MetadataFeed) -> None:
        self.parts = parts
        self.metadata = metadata
        self.owned: set[int] = set()
        # Partitions just assigned: their records wait (`parked`) until the worker knows
        # which of their samples the previous owner stored.
        self.taking_over: set[int] = set()
        self.parked: list[ConsumerRecord] = []
        self.gpu_partition: dict[str, int] = {}
        self.new_gpu_partitions: dict[str, int] = {}
        self.samples_partitions: set[int] = {0}
        self.stored_progress: dict[int, dict[MetaKey, int]] = {}
        self._progress_written: dict[int, dict[MetaKey, int]] = {}
        self._progress_at = 0.0
        self.pruned_at = time.monotonic()

    @property
    def owned_gpus(self) -> set[str]:
        """The GPUs whose facts this worker corrects: those of its samples partitions."""
        return {g for g, p in self.gpu_partition.items() if p in self.owned}

    def note_partition(self, gpu_uuid: str, partition: int) -> None:
        """A GPU's sample arrived in this samples partition."""
        if self.gpu_partition.get(gpu_uuid) != partition:
            self.gpu_partition[gpu_uuid] = partition
            self.new_gpu_partitions[gpu_uuid] = partition

    async def store_gpu_partitions(self) -> None:
        """Before the facts: whoever scans the facts learns who corrects them."""
        if not self.new_gpu_partitions:
            return
        pairs = list(self.new_gpu_partitions.items())
        await self.parts.calls.run(self.parts.sink().upsert_gpu_partitions, pairs, time.time())
        for gpu, partition in pairs:
            if self.new_gpu_partitions.get(gpu) == partition:
                del self.new_gpu_partitions[gpu]

    # -- ownership -----------------------------------------------------------------------
    def own(self, partitions: set[int]) -> None:
        self.owned |= partitions
        self.taking_over |= partitions

    def release(self, partitions: set[int]) -> None:
        self.owned -= partitions
        self.taking_over -= partitions
        # Not read for us any more: the next owner reads them from the committed offset.
        self.parked = [r for r in self.parked if r.partition not in partitions]
        for partition in partitions:
            self._progress_written.pop(partition, None)

    async def take_over(self, take_samples: Callable[[ConsumerRecord, float], None]) -> None:
        """Make newly assigned partitions ours: learn the newest fact in the store (a sample
        the previous owner costed is a duplicate here too, so one no later than that is
        checked in the store), redo the corrections the previous owner may have left undone,
        then cost their records (`take_samples`)."""
        partitions = self.taking_over & self.owned
        if not partitions:
            return
        meta_next = dict(self.metadata.next_offsets)
        newest = await self.parts.calls.run(self.parts.sink().newest_fact_ts)
        if newest > 0:  # a store with facts: some of these samples may be among them
            for partition in partitions:
                self.parts.joiner.check_store_until(partition, newest)
        progress = await self.parts.calls.run(self.parts.sink().load_progress)
        scopes: list[Scope] = []
        for partition in partitions:
            done = progress.get(partition, {})
            for key, offset, logged in self.metadata.scope_log:
                if offset >= done.get(key, 0):
                    scopes.extend(logged)
        log.info(
            "taking over samples partitions %s: %s, %d corrections to redo",
            sorted(partitions),
            f"samples up to {iso_utc(newest, 'milliseconds')} checked in the store"
            if newest > 0
            else "no facts stored yet",
            len(set(scopes)),
        )
        await self.apply(scopes, partitions)
        await self.record_progress(meta_next, partitions, force=True)
        self.taking_over -= partitions
        parked = [r for r in self.parked if r.partition in partitions]
        self.parked = [r for r in self.parked if r.partition not in partitions]
        now = time.monotonic()
        for record in parked:
            take_samples(record, now)

    # -- corrections -----------------------------------------------------------------------
    async def apply(self, scopes: list[Scope], partitions: set[int]) -> None:
        """Correct the stored facts in these scopes of the GPUs of these partitions."""
        if not scopes or not partitions:
            return
        stamps_by_gpu: dict[str, set[int]] = defaultdict(set)
        # Jobs whose tags alone changed, retagged together: a team renamed is one statement.
        for scope in self.parts.state.merged_retags(scopes):
            await self._retag(scope, partitions)
        for scope in dict.fromkeys(s for s in scopes if not s.retag):
            if scope.price_only:
                keys = await self._reprice(scope, partitions)
            else:
                keys = await self.parts.calls.run(self.parts.sink().keys_in_scope, scope)
            for gpu, ts_ms in keys:
                stamps_by_gpu[gpu].add(ts_ms)
        owners = await self._partitions_of(list(stamps_by_gpu))
        mine = {
            gpu: sorted(stamps)
            for gpu, stamps in stamps_by_gpu.items()
            if owners.get(gpu, LEGACY_OWNER_PARTITION) in partitions
        }
        await self._correct(mine)

    async def _reprice(self, scope: Scope, partitions: set[int]) -> list[tuple[str, int]]:
        """Reprice the facts of the GPUs of these partitions in a price-only scope in the
        store, a statement per chunk; the samples whose facts the store cannot reprice are
        given back, to be re-costed."""
        calls, sink = self.parts.calls, self.parts.sink
        plan = await self._owned_plan(scope, partitions)
        spans_of: dict[PriceKey, list[PriceSpan]] = defaultdict(list)
        keys = {key for _, _, key, _ in plan}
        for span in price_spans(keys, self.parts.state, scope.t_from, scope.t_to):
            spans_of[span.key].append(span)
        leftovers: list[tuple[str, int]] = []
        for chunk in reprice_chunks(scope, plan):
            spans_here = [span for key in sorted(chunk.keys, key=astuple) for span in spans_of[key]]
            part, gpus = chunk.scope, chunk.gpus
            left, sampled = await calls.run(sink().reprice_leftovers, part, gpus, spans_here)
            leftovers += left
            stored = await calls.run(sink().reprice_rows, part, gpus)
            token = reprice_token(chunk, spans_here, stored[1])
            statements: list[Statement] = [
                (sink().reprice, (part, gpus, spans_here, token, stored))
            ]
            if sampled:
                basis = self.parts.state.idle_basis.value
                statements.append(
                    (sink().reprice, (part, gpus, spans_here, token + ":samples", stored, basis))
                )
            await self._restate_in_store(chunk, stored, statements)
        return leftovers

    async def _retag(self, scope: Scope, partitions: set[int]) -> None:
        """Give the facts of the GPUs of these partitions that carry the jobs' ids their new
        tags (`Scope.retag`) in the store, a statement per chunk."""
        calls, sink = self.parts.calls, self.parts.sink
        for chunk in reprice_chunks(scope, await self._owned_plan(scope, partitions)):
            stored = await calls.run(sink().reprice_rows, chunk.scope, chunk.gpus)
            token = retag_token(chunk, stored[1])
            await self._restate_in_store(
                chunk, stored, [(sink().retag, (chunk.scope, chunk.gpus, token, stored))]
            )

    async def _owned_plan(
        self, scope: Scope, partitions: set[int]
    ) -> list[tuple[int, str, PriceKey, int]]:
        """`FactSink.reprice_plan` of a scope, of the GPUs of these partitions."""
        plan = await self.parts.calls.run(self.parts.sink().reprice_plan, scope)
        owners = await self._partitions_of(sorted({gpu for _, gpu, _, _ in plan}))
        return [p for p in plan if owners.get(p[1], LEGACY_OWNER_PARTITION) in partitions]

    async def _restate_in_store(
        self,
        chunk: RepriceChunk,
        stored: tuple[int, int],
        statements: list[Statement],
    ) -> None:
        """Run a chunk's statements (each cancels and restates its rows in the store) and
        count what they wrote; `stored` is the chunk's `reprice_rows` before them."""
        calls, sink = self.parts.calls, self.parts.sink
        try:
            for statement, args in statements:
                await calls.run(statement, *args, permanent=True)
        except PermanentStoreError as exc:
            what = chunk.scope.describe()
            log.error("the store refuses to restate %s, which stays: %s", what, exc)
            return
        written = (await calls.run(sink().reprice_rows, chunk.scope, chunk.gpus))[1] - stored[1]
        if written > 0:
            self.parts.stats.corrections += 1
            self.parts.stats.corrected_rows += written
            for observer in self.parts.observers:
                observer.on_corrected(set(chunk.gpus))

    async def _partitions_of(self, gpus: list[str]) -> dict[str, int]:
        unknown = [g for g in gpus if g not in self.gpu_partition]
        if unknown:
            found = await self.parts.calls.run(self.parts.sink().load_gpu_partitions, unknown)
            self.gpu_partition.update(found)
        return {g: self.gpu_partition[g] for g in gpus if g in self.gpu_partition}

    async def _correct(
        self, stamps_by_gpu: dict[str, list[int]], chunk: int = 5000, batch_rows: int = 50_000
    ) -> None:
        cancels: list[Row] = []
        restates: list[Row] = []
        histories: list[tuple[str, list[tuple[int, Row]]]] = []
        corrected: set[str] = set()
        # Samples of many GPUs are read together: a change's samples are often one or two
        # per GPU (a price's first millisecond, a job's start), over thousands of GPUs.
        keys = [(gpu, ts) for gpu in sorted(stamps_by_gpu) for ts in stamps_by_gpu[gpu]]
        for i in range(0, len(keys), chunk):
            for gpu, stored, c, r in await self._recost(keys[i : i + chunk]):
                cancels += c
                restates += r
                histories.append((gpu, stored))
                corrected.add(gpu)
            if len(cancels) + len(restates) >= batch_rows:
                await self._insert(cancels, restates, histories)
                cancels, restates, histories = [], [], []
        await self._insert(cancels, restates, histories)
        if corrected:
            for observer in self.parts.observers:
                observer.on_corrected(corrected)

    async def _recost(
        self, keys: list[tuple[str, int]]
    ) -> list[tuple[str, list[tuple[int, Row]], list[Row], list[Row]]]:
        """For each GPU these (GPU, ts ms) keys change: its stored rows at them, and the rows
        to cancel and restate so that they are what its raw samples cost now."""
        sink = self.parts.sink()
        samples = await self.parts.calls.run(sink.raw_samples, keys)
        stored = await self.parts.calls.run(sink.stored_rows, keys)
        stored_at: dict[tuple[object, object], list[tuple[int, Row]]] = defaultdict(list)
        for sign, row in stored:
            stored_at[(row[_GPU_AT], row[0])].append((sign, row))
        recosted_at: dict[tuple[object, object], list[Row]] = defaultdict(list)
        for fact in self.parts.state.cost_all(samples):
            row = fact_row(fact)
            recosted_at[(row[_GPU_AT], row[0])].append(row)
        changes: dict[str, tuple[list[Row], list[Row]]] = {}
        # A sample whose raw copy is missing cannot be re-costed: its facts stay.
        for (gpu, ts), rows in recosted_at.items():
            c, r = correction(live_rows(stored_at.get((gpu, ts), [])), rows)
            if c or r:
                cancels, restates = changes.setdefault(str(gpu), ([], []))
                cancels += c
                restates += r
        history: dict[str, list[tuple[int, Row]]] = defaultdict(list)
        for sign, row in stored:
            if row[_GPU_AT] in changes:
                history[str(row[_GPU_AT])].append((sign, row))
        return [(gpu, history[gpu], c, r) for gpu, (c, r) in sorted(changes.items())]

    async def _insert(
        self,
        cancels: list[Row],
        restates: list[Row],
        histories: list[tuple[str, list[tuple[int, Row]]]],
    ) -> None:
        if not cancels and not restates:
            return
        token = correction_token(histories)
        try:
            await self.parts.calls.run(
                self.parts.sink().insert_rows, cancels, restates, token, permanent=True
            )
        except PermanentStoreError as exc:
            # Rows re-costed from stored samples: a refusal here is the store's, not a
            # message's; the facts stay as they were, and the worker goes on.
            log.error(
                "the store refuses a correction of %d rows, which is left undone: %s",
                len(cancels) + len(restates),
                exc,
            )
            return
        self.parts.stats.corrections += 1
        self.parts.stats.corrected_rows += len(cancels) + len(restates)

    # -- progress ----------------------------------------------------------------------------
    async def record_progress(
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
        await self.parts.calls.run(self.parts.sink().record_progress, rows, time.time())
        self._progress_at = time.monotonic()
        for partition, topic, meta_partition, offset in rows:
            self._progress_written.setdefault(partition, {})[(topic, meta_partition)] = offset

    async def prune_scope_log(self, partitions_now: set[int]) -> None:
        """Forget the scopes that every samples partition's owner has corrected."""
        self.pruned_at = time.monotonic()
        progress = await self.parts.calls.run(self.parts.sink().load_progress)
        self.samples_partitions |= partitions_now  # partitions may have been added
        metadata = self.metadata
        keys = {key for key, _, _ in metadata.scope_log}
        found = floors(progress, self.samples_partitions, keys)
        metadata.scope_log = [e for e in metadata.scope_log if e[1] >= found.get(e[0], 0)]
