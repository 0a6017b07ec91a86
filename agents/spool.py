"""The on-disk spool: every record the agent publishes waits here until Kafka acknowledges it.

Records are appended to segment files in the spool folder before anything is sent, and one
sender takes them from the head, in order, and acknowledges them once Kafka has them. So an
unreachable broker delays records (they pile up on disk, bounded), a restarted agent sends what
the previous one left, and per-GPU order holds because one node's records leave in the order
they were read.

Files: `seg-<first seq>.log` holds frames `<u32 length><u32 crc32><u64 seq><body>`, body =
`<u16 topic length><u16 key length><u32 samples><topic><key><value>`; `cursor` says which
records are done: every seq below `next`, and those in `[skip_from, skip_to)` (dropped while
older ones were in flight). It is rewritten in place after every acknowledgement, alternately
in two checksummed slots, so a torn write leaves the previous slot valid. A torn frame at the
end of a segment (a crash mid-write) is cut off at start. One agent per folder: `lock` holds an
exclusive flock.

When the records waiting exceed `max_bytes`, the oldest that are not in flight are dropped and
counted; the agent logs it and exports the count.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import struct
import threading
import time
import zlib
from collections import deque
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

log = logging.getLogger(__name__)

_FRAME = struct.Struct("<IIQ")  # body length, crc32 of the body, seq
_CURSOR = struct.Struct("<QQQQ")  # write count, next, skip_from, skip_to
_CURSOR_SLOT = 64  # bytes per slot: the fields and their crc32
_BODY = struct.Struct("<HHI")  # topic length, key length, samples
_SEGMENT = "seg-{:020d}.log"
# Values of recent records stay in memory up to this much, so a healthy agent never reads its
# own spool back; older ones are read from disk when their turn comes.
_VALUE_CACHE_BYTES = 4 * 1024 * 1024


class SpoolError(RuntimeError):
    """The spool folder cannot be used; the message says why and what to do."""


@dataclass(frozen=True)
class SpoolRecord:
    seq: int
    topic: str
    key: bytes
    value: bytes
    samples: int  # GPU samples in the value (0 for job, node and usage events)


@dataclass
class SpoolStats:
    """Counters since this spool was opened, and what waits now."""

    appended_samples: int = 0
    delayed_samples: int = 0  # appended while older records were still waiting: Kafka was slow
    sent_samples: int = 0  # acknowledged by Kafka
    sent_records: int = 0
    dropped_samples: int = 0  # the spool was full
    dropped_records: int = 0
    backlog_records: int = 0
    backlog_samples: int = 0
    backlog_bytes: int = 0
    recovered_records: int = 0  # found on disk at start, left by a previous agent


@dataclass
class _Entry:
    seq: int
    segment: int  # first seq of its segment
    offset: int  # of its frame in the segment file
    size: int  # frame size on disk
    samples: int
    value: bytes | None  # the record, while cached
    header: tuple[str, bytes] | None = None  # (topic, key), while cached


@dataclass
class _Cursor:
    next: int = 0
    skip_from: int = 0
    skip_to: int = 0

    def done(self, seq: int) -> bool:
        return seq < self.next or self.skip_from <= seq < self.skip_to


class Spool:
    """A bounded, ordered, restart-safe queue of Kafka records in folder `directory`."""

    def __init__(
        self, directory: Path, max_bytes: int, *, segment_bytes: int | None = None
    ) -> None:
        if max_bytes <= 0:
            raise SpoolError(f"spool max size must be > 0 bytes, got {max_bytes}")
        self.directory = Path(directory)
        self.max_bytes = max_bytes
        self.segment_bytes = segment_bytes or max(64 * 1024, min(max_bytes // 16, 16 << 20))
        self.stats = SpoolStats()
        self._cond = threading.Condition()
        self._closed = False
        self._backlog: deque[_Entry] = deque()
        self._inflight = 0
        self._cached_bytes = 0
        self._segments: list[int] = []  # first seqs, oldest first
        self._write_fd: int | None = None
        self._write_segment = -1
        self._write_size = 0
        self._read_fds: dict[int, int] = {}
        self._last_drop_log: float | None = None
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._lock_fd = os.open(self.directory / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise SpoolError(
                f"cannot use spool folder {self.directory}: {exc.strerror}; "
                "give the agent a writable --spool-dir"
            ) from exc
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            other = os.pread(self._lock_fd, 32, 0).decode(errors="replace").strip()
            os.close(self._lock_fd)
            raise SpoolError(
                f"spool folder {self.directory} is in use by another agent (pid {other or '?'}); "
                "give each agent its own --spool-dir"
            ) from None
        os.ftruncate(self._lock_fd, 0)
        os.pwrite(self._lock_fd, str(os.getpid()).encode(), 0)
        self._cursor = self._read_cursor()
        self._next_seq = self._cursor.next
        self._recover()
        with self._cond:
            self._enforce_bound()

    # -- the agent's side

    def append(self, topic: str, key: bytes, value: bytes, samples: int = 0) -> None:
        """Store a record; it leaves once Kafka acknowledges it (or the spool drops it)."""
        topic_bytes = topic.encode()
        body = _BODY.pack(len(topic_bytes), len(key), samples) + topic_bytes + key + value
        with self._cond:
            if self._closed:
                raise SpoolError("the spool is closed")
            seq = self._next_seq
            self._next_seq += 1
            frame = _FRAME.pack(len(body), zlib.crc32(body), seq) + body
            if self._write_fd is None or self._write_size >= self.segment_bytes:
                self._roll(seq)
            assert self._write_fd is not None
            offset = self._write_size
            os.write(self._write_fd, frame)
            self._write_size += len(frame)
            if self._backlog:
                self.stats.delayed_samples += samples
            cached = self._cached_bytes + len(value) <= _VALUE_CACHE_BYTES
            if cached:
                self._cached_bytes += len(value)
            self._backlog.append(
                _Entry(
                    seq,
                    self._write_segment,
                    offset,
                    len(frame),
                    samples,
                    value if cached else None,
                    (topic, key) if cached else None,
                )
            )
            self.stats.appended_samples += samples
            self.stats.backlog_records += 1
            self.stats.backlog_samples += samples
            self.stats.backlog_bytes += len(frame)
            self._enforce_bound()
            self._cond.notify_all()

    # -- the sender's side

    def take(self, max_bytes: int, timeout_s: float | None = None) -> list[SpoolRecord]:
        """The oldest records, now in flight: a run of one topic and key (or one record).

        Records already in flight come back first (a retry sends the same ones). Waits up to
        `timeout_s` for a record; an empty list when none came or the spool is closed.
        """
        with self._cond:
            if not self._backlog and not self._closed:
                self._cond.wait(timeout_s)
            if not self._backlog:
                return []
            if self._inflight:
                return [self._load(self._backlog[i]) for i in range(self._inflight)]
            first = self._load(self._backlog[0])
            records = [first]
            size = len(first.value)
            if first.samples:
                for entry in islice(self._backlog, 1, None):
                    if not entry.samples:
                        break
                    record = self._load(entry)
                    if (record.topic, record.key) != (first.topic, first.key):
                        break
                    if size + len(record.value) > max_bytes:
                        break
                    records.append(record)
                    size += len(record.value)
            self._inflight = len(records)
            return records

    def ack(self) -> None:
        """Kafka has the records in flight: they are done."""
        with self._cond:
            done = [self._backlog.popleft() for _ in range(self._inflight)]
            self._inflight = 0
            if not done:
                return
            for entry in done:
                self._forget(entry)
                self.stats.sent_records += 1
                self.stats.sent_samples += entry.samples
            self._cursor.next = done[-1].seq + 1
            if self._cursor.skip_from <= self._cursor.next < self._cursor.skip_to:
                self._cursor.next = self._cursor.skip_to
            if self._cursor.next >= self._cursor.skip_to:
                self._cursor.skip_from = self._cursor.skip_to = 0
            self._write_cursor()
            self._delete_done_segments()
            self._cond.notify_all()  # wait_empty() may be waiting

    def drop_inflight(self, reason: str) -> None:
        """Give up on the records in flight (Kafka refused them for good): count them."""
        with self._cond:
            count = self._inflight
            samples = sum(self._backlog[i].samples for i in range(count))
            self.stats.dropped_records += count
            self.stats.dropped_samples += samples
            self.stats.sent_records -= count  # ack() counts them as sent
            self.stats.sent_samples -= samples
        log.error("dropped %d records (%d samples) Kafka refused: %s", count, samples, reason)
        self.ack()

    def wake(self) -> None:
        """Let a `take()` that waits return now (the sender is stopping)."""
        with self._cond:
            self._cond.notify_all()

    def wait_empty(self, timeout_s: float) -> bool:
        """Wait until every record is acknowledged (or dropped); False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._backlog, timeout_s)

    def close(self) -> None:
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.notify_all()
            if self._write_fd is not None:
                with contextlib.suppress(OSError):
                    os.fsync(self._write_fd)
                os.close(self._write_fd)
                self._write_fd = None
            for fd in self._read_fds.values():
                os.close(fd)
            self._read_fds.clear()
            os.close(self._cursor_fd)
            os.close(self._lock_fd)

    def __enter__(self) -> Spool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- inside (callers hold self._cond)

    def _load(self, entry: _Entry) -> SpoolRecord:
        if entry.value is not None and entry.header is not None:
            topic, key = entry.header
            return SpoolRecord(entry.seq, topic, key, entry.value, entry.samples)
        fd = self._read_fds.get(entry.segment)
        if fd is None:
            fd = os.open(self.directory / _SEGMENT.format(entry.segment), os.O_RDONLY)
            self._read_fds[entry.segment] = fd
        frame = os.pread(fd, entry.size, entry.offset)
        body = frame[_FRAME.size :]
        topic_len, key_len, samples = _BODY.unpack_from(body)
        start = _BODY.size
        topic = body[start : start + topic_len].decode()
        key = body[start + topic_len : start + topic_len + key_len]
        value = body[start + topic_len + key_len :]
        return SpoolRecord(entry.seq, topic, key, value, samples)

    def _forget(self, entry: _Entry) -> None:
        if entry.value is not None:
            self._cached_bytes -= len(entry.value)
        self.stats.backlog_records -= 1
        self.stats.backlog_samples -= entry.samples
        self.stats.backlog_bytes -= entry.size

    def _enforce_bound(self) -> None:
        """Drop the oldest records not in flight until the backlog fits in max_bytes."""
        dropped: list[_Entry] = []
        while self.stats.backlog_bytes > self.max_bytes and len(self._backlog) > self._inflight:
            if self._inflight:
                entry = self._backlog[self._inflight]
                del self._backlog[self._inflight]
            else:
                entry = self._backlog.popleft()
            self._forget(entry)
            dropped.append(entry)
        if not dropped:
            return
        samples = sum(e.samples for e in dropped)
        self.stats.dropped_records += len(dropped)
        self.stats.dropped_samples += samples
        first, last = dropped[0].seq, dropped[-1].seq + 1
        if self._inflight:
            # Older records are in flight: remember the dropped run after them.
            if self._cursor.skip_to == first and self._cursor.skip_from:
                self._cursor.skip_to = last
            else:
                self._cursor.skip_from, self._cursor.skip_to = first, last
        else:
            self._cursor.next = last
        now = time.monotonic()
        if self._last_drop_log is None or now - self._last_drop_log >= 60:
            self._last_drop_log = now  # once a minute while full, not once a record
            log.warning(
                "spool %s is full (%d bytes max): dropping the oldest records; "
                "%d samples dropped so far",
                self.directory,
                self.max_bytes,
                self.stats.dropped_samples,
            )
        self._write_cursor()
        self._delete_done_segments()

    def _roll(self, first_seq: int) -> None:
        if self._write_fd is not None:
            os.close(self._write_fd)
        path = self.directory / _SEGMENT.format(first_seq)
        self._write_fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self._write_segment = first_seq
        self._write_size = os.fstat(self._write_fd).st_size
        self._segments.append(first_seq)

    def _delete_done_segments(self) -> None:
        """Remove segments whose records are all done (acknowledged or dropped)."""
        live = self._backlog[0].segment if self._backlog else self._write_segment
        while self._segments and self._segments[0] < live:
            first = self._segments.pop(0)
            fd = self._read_fds.pop(first, None)
            if fd is not None:
                os.close(fd)
            with contextlib.suppress(FileNotFoundError):
                (self.directory / _SEGMENT.format(first)).unlink()

    def _read_cursor(self) -> _Cursor:
        """The newest valid slot of the cursor file (none: nothing done yet)."""
        self._cursor_fd = os.open(self.directory / "cursor", os.O_RDWR | os.O_CREAT, 0o644)
        self._cursor_writes = 0
        data = os.pread(self._cursor_fd, 2 * _CURSOR_SLOT, 0)
        best: tuple[int, _Cursor] | None = None
        for slot in range(2):
            raw = data[slot * _CURSOR_SLOT : slot * _CURSOR_SLOT + _CURSOR.size + 4]
            if len(raw) < _CURSOR.size + 4:
                continue
            fields, crc = raw[: _CURSOR.size], struct.unpack("<I", raw[_CURSOR.size :])[0]
            if zlib.crc32(fields) != crc:
                continue
            writes, next_seq, skip_from, skip_to = _CURSOR.unpack(fields)
            if best is None or writes > best[0]:
                best = (writes, _Cursor(next_seq, skip_from, skip_to))
        if best is None:
            return _Cursor()
        self._cursor_writes = best[0]
        return best[1]

    def _write_cursor(self) -> None:
        self._cursor_writes += 1
        c = self._cursor
        fields = _CURSOR.pack(self._cursor_writes, c.next, c.skip_from, c.skip_to)
        slot = self._cursor_writes % 2
        os.pwrite(
            self._cursor_fd, fields + struct.pack("<I", zlib.crc32(fields)), slot * _CURSOR_SLOT
        )

    def _recover(self) -> None:
        """Rebuild the backlog from the segments a previous agent left."""
        segments = sorted(
            int(p.name[4:-4]) for p in self.directory.glob("seg-*.log") if p.name[4:-4].isdigit()
        )
        last_seq = self._cursor.next - 1
        for first in segments:
            path = self.directory / _SEGMENT.format(first)
            data = path.read_bytes()
            offset = 0
            while offset + _FRAME.size <= len(data):
                length, crc, seq = _FRAME.unpack_from(data, offset)
                end = offset + _FRAME.size + length
                body = data[offset + _FRAME.size : end]
                if end > len(data) or zlib.crc32(body) != crc:
                    break
                last_seq = max(last_seq, seq)
                if not self._cursor.done(seq):
                    _, _, samples = _BODY.unpack_from(body)
                    self._backlog.append(_Entry(seq, first, offset, end - offset, samples, None))
                    self.stats.backlog_records += 1
                    self.stats.backlog_samples += samples
                    self.stats.backlog_bytes += end - offset
                offset = end
            if offset < len(data):
                log.warning(
                    "spool segment %s: %d bytes after offset %d are torn or corrupt; cut off",
                    path,
                    len(data) - offset,
                    offset,
                )
                with open(path, "r+b") as f:
                    f.truncate(offset)
            self._segments.append(first)
        self._next_seq = max(self._next_seq, last_seq + 1)
        self.stats.recovered_records = self.stats.backlog_records
        if self._backlog:
            log.info(
                "spool %s: %d records (%d samples) left by a previous agent will be sent first",
                self.directory,
                self.stats.backlog_records,
                self.stats.backlog_samples,
            )
        self._delete_done_segments()
