"""The worker's decisions about samples in flight, with no I/O.

A sample waits a short grace of event time (ARCHITECTURE.md §3) so that metadata racing it can
arrive first; it is released once the stream's event time has moved `grace_s` past the end
of its interval, or after `max_hold_wall_s` of wall time when the partition goes quiet.
A sample is identified by (gpu_uuid, ts): one seen before is a duplicate and dropped.
Offsets are committable only up to the first message that still has samples held, so a
crash never skips a sample that was not stored.
"""

from __future__ import annotations

from array import array
from bisect import bisect_left
from collections import defaultdict
from dataclasses import dataclass, field

from gpuledger.ledger.timekeys import to_ms
from gpuledger.schema.messages import GpuSample


class Stamps:
    """The sample times (ms) of one GPU costed so far, sorted in a compact array.

    An hour of one GPU at 1 Hz takes 29 KiB here and about 380 KiB in a set of ints: the
    difference between half a gigabyte and five for a worker of 10,000 GPUs. Samples come in
    time order, so adding one is an append; a late one is inserted in place.
    """

    __slots__ = ("times",)

    def __init__(self) -> None:
        self.times = array("q")

    def add(self, ts_ms: int) -> bool:
        """Remember `ts_ms`; False when it was known already."""
        times = self.times
        if not times or ts_ms > times[-1]:
            times.append(ts_ms)
            return True
        at = bisect_left(times, ts_ms)
        if at < len(times) and times[at] == ts_ms:
            return False
        times.insert(at, ts_ms)
        return True

    def __contains__(self, ts_ms: object) -> bool:
        times = self.times
        if not isinstance(ts_ms, int) or not times or ts_ms > times[-1]:
            return False
        at = bisect_left(times, ts_ms)
        return at < len(times) and times[at] == ts_ms

    def discard(self, ts_ms: int) -> None:
        at = bisect_left(self.times, ts_ms)
        if at < len(self.times) and self.times[at] == ts_ms:
            del self.times[at]

    def forget_before(self, ts_ms: int) -> None:
        del self.times[: bisect_left(self.times, ts_ms)]

    def __len__(self) -> int:
        return len(self.times)


@dataclass(slots=True)
class Held:
    sample: GpuSample
    partition: int
    offset: int
    arrived_wall: float


@dataclass
class PartitionProgress:
    """Which offsets of one partition still have samples held (not yet stored)."""

    pending: dict[int, int] = field(default_factory=dict)
    next_offset: int | None = None

    def seen(self, offset: int, held: int) -> None:
        if held:
            self.pending[offset] = self.pending.get(offset, 0) + held
        if self.next_offset is None or offset + 1 > self.next_offset:
            self.next_offset = offset + 1

    def stored(self, offset: int) -> None:
        left = self.pending.get(offset, 0) - 1
        if left > 0:
            self.pending[offset] = left
        else:
            self.pending.pop(offset, None)

    def committable(self) -> int | None:
        if self.pending:
            return min(self.pending)
        return self.next_offset


class Joiner:
    """Holds samples for their grace, drops duplicates, tracks what may be committed."""

    def __init__(
        self,
        grace_s: float = 1.0,
        max_hold_wall_s: float = 3.0,
        dedup_horizon_s: float = 3600.0,
    ) -> None:
        self.grace_s = grace_s
        self.max_hold_wall_s = max_hold_wall_s
        self.dedup_horizon_s = dedup_horizon_s
        self.watermark = 0.0  # the latest event time (end of a sample's interval) seen
        # In arrival order. A flush passes over all of them: at the rates a worker sustains
        # (a few seconds of samples held) that costs less than keeping them in a heap.
        self._held: list[Held] = []
        self._seen: dict[str, Stamps] = defaultdict(Stamps)
        # partition -> the newest fact in the store when this worker took the partition over.
        self._check_until: dict[int, float] = {}
        self._pruned_at = 0.0
        self._progress: dict[int, PartitionProgress] = defaultdict(PartitionProgress)
        self.duplicates = 0

    # -- what the store already holds -------------------------------------------------
    def check_store_until(self, partition: int, ts: float) -> None:
        """A partition this worker takes over: its previous owner may have stored any sample
        up to `ts` (the newest fact in the store), so a sample of it no later than that,
        which memory cannot vouch for, is checked in the store."""
        self._check_until[partition] = max(ts, self._check_until.get(partition, ts))
        self.watermark = max(self.watermark, ts)

    def needs_store_check(self, held: Held) -> bool:
        """True for a sample memory cannot vouch for: too old for it, or in a taken-over
        partition and no later than what the store held when this worker took it over."""
        ts = held.sample.ts
        if ts < self.watermark - self.dedup_horizon_s:
            return True
        until = self._check_until.get(held.partition)
        return until is not None and ts <= until

    def to_check(self, helds: list[Held]) -> list[Held]:
        """Those of `helds` that need a store check (`needs_store_check`), in one pass: with
        no partition taken over, only the samples older than the horizon."""
        if self._check_until:
            return [h for h in helds if self.needs_store_check(h)]
        oldest = self.watermark - self.dedup_horizon_s
        return [h for h in helds if h.sample.ts < oldest]

    # -- samples in ----------------------------------------------------------------
    def offer(
        self, samples: list[GpuSample], partition: int, offset: int, now_wall: float
    ) -> list[GpuSample]:
        """Take one message's samples; return those dropped as duplicates."""
        dropped: list[GpuSample] = []
        held = 0
        seen = self._seen
        keep = self._held.append
        watermark = self.watermark
        for sample in samples:
            ts = sample.ts
            ts_ms = round(ts * 1000)  # sample_key(), inline: this runs for every sample
            if not seen[sample.gpu_uuid].add(ts_ms):
                dropped.append(sample)
                continue
            keep(Held(sample, partition, offset, now_wall))
            held += 1
            end = ts + sample.interval_s
            if end > watermark:
                watermark = end
        self.watermark = watermark
        self._progress[partition].seen(offset, held)
        self.duplicates += len(dropped)
        return dropped

    # -- samples out -----------------------------------------------------------------
    def due(self, now_wall: float, *, flush_all: bool = False) -> list[Held]:
        """Release the samples whose grace has passed (all of them when flushing), in the
        order they arrived."""
        if flush_all:
            out, self._held = self._held, []
            return out
        ready: list[Held] = []
        keep: list[Held] = []
        limit = self.watermark - self.grace_s
        max_hold = self.max_hold_wall_s
        for held in self._held:
            sample = held.sample
            if sample.ts + sample.interval_s <= limit or now_wall - held.arrived_wall >= max_hold:
                ready.append(held)
            else:
                keep.append(held)
        self._held = keep
        return ready

    def stored(self, helds: list[Held]) -> None:
        """The facts of these samples are in the store: their offsets may be committed."""
        for held in helds:
            self._progress[held.partition].stored(held.offset)
        self._prune()

    def committable(self) -> dict[int, int]:
        """partition -> the next offset to read, safe to commit."""
        out: dict[int, int] = {}
        for partition, progress in self._progress.items():
            offset = progress.committable()
            if offset is not None:
                out[partition] = offset
        return out

    def revoke(self, partitions: set[int]) -> None:
        """Partitions taken away by a rebalance: forget their progress."""
        for partition in partitions:
            self._progress.pop(partition, None)
            self._check_until.pop(partition, None)

    @property
    def held_count(self) -> int:
        return len(self._held)

    def _prune(self) -> None:
        # A pass over every GPU, at most once per tenth of the horizon of event time: a
        # GPU's memory holds between one and 2.1 horizons of samples.
        if self.watermark - self._pruned_at < self.dedup_horizon_s / 10:
            return
        self._pruned_at = self.watermark
        horizon_ms = to_ms(self.watermark - self.dedup_horizon_s)
        for stamps in self._seen.values():
            if len(stamps) > 2 * self.dedup_horizon_s:
                stamps.forget_before(horizon_ms)
