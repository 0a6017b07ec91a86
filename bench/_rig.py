"""The engines a benchmark runs on, as deployed: the embedded broker, a fresh embedded store
(chdb behind ClickHouse's HTTP interface) per run, `gpuledger worker` processes, and the
probes that time them (rows visible through the store, CPU seconds from /proc)."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kafka import KafkaProducer

from bench._fleet import Fleet, Tick
from gpuledger.broker import EmbeddedBroker, ensure_topics
from gpuledger.children import die_with_parent
from gpuledger.schema.migrate import migrate
from gpuledger.schema.pricebook import load_price_book
from gpuledger.schema.topics import Topics
from gpuledger.store import connect, ensure_store, stop_owned_stores

ROOT = Path(__file__).resolve().parent.parent
_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (all its threads) so far."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TICK


def rss_mb(pid: int, field: str = "VmRSS") -> float:
    """A process's resident memory in MB (`field` VmHWM: its peak)."""
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return 0.0


def machine_cpu_seconds() -> float:
    """CPU seconds every core of the machine spent busy so far (all processes)."""
    with open("/proc/stat") as handle:
        parts = [int(x) for x in handle.readline().split()[1:]]
    idle = parts[3] + parts[4]
    return (sum(parts[:8]) - idle) / _TICK


@dataclass
class Store:
    path: Path
    pid: int
    client: Any

    @property
    def url(self) -> str:
        return f"chdb://{self.path}"

    def count(self, sql: str) -> int:
        return int(self.client.query(sql).result_rows[0][0])


@dataclass
class Rig:
    """A broker with the topics under `prefix`, and a scratch folder for stores and logs."""

    prefix: str = "bench."
    partitions: int = 1
    broker: EmbeddedBroker = field(default_factory=EmbeddedBroker)
    tmp: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="gpuledger-bench-")))
    _stores: int = 0

    @property
    def topics(self) -> Topics:
        return Topics(self.prefix)

    def __enter__(self) -> Rig:
        self.broker.start()
        ensure_topics(self.broker.bootstrap, self.topics, self.partitions)
        return self

    def __exit__(self, *exc: object) -> None:
        stop_owned_stores()
        self.broker.stop()

    def new_store(self, source_root: Path = ROOT) -> Store:
        """A fresh store (its own chdb folder), migrated with `source_root`'s migrations."""
        self._stores += 1
        path = (self.tmp / f"store{self._stores}").resolve()
        info = ensure_store(path)
        client = connect(f"chdb://{path}")
        migrate(client, source_root / "schema" / "clickhouse")
        return Store(path, info.pid, client)

    def add_topics(self, prefix: str, partitions: int) -> Topics:
        topics = Topics(prefix)
        ensure_topics(self.broker.bootstrap, topics, partitions)
        return topics


def producer(bootstrap: str) -> KafkaProducer:
    """As the agent publishes (agents/publisher.py): lz4, acks=all."""
    return KafkaProducer(
        bootstrap_servers=bootstrap,
        acks="all",
        compression_type="lz4",
        linger_ms=20,
        batch_size=1 << 20,
        max_request_size=16 << 20,
    )


def publish_prices(bootstrap: str, topics: Topics) -> int:
    out = producer(bootstrap)
    entries = load_price_book()
    for entry in entries:
        out.send(topics.prices, key=entry.key.encode(), value=entry.model_dump_json().encode())
    out.flush(timeout=60)
    out.close()
    return len(entries)


@dataclass
class Published:
    messages: int = 0
    samples: int = 0
    events: int = 0
    bytes: int = 0


@dataclass
class Backlog:
    """Ticks of a fleet, generated once and published to as many topic sets as needed."""

    fleet: Fleet
    ticks: list[Tick]

    @classmethod
    def of(cls, fleet: Fleet, ticks: int) -> Backlog:
        return cls(fleet, list(fleet.ticks(ticks)))

    @property
    def samples(self) -> int:
        return sum(fleet_samples(v) for t in self.ticks for _, v in t.batches)

    def publish_metadata(self, bootstrap: str, topics: Topics) -> Published:
        """Prices, and the job, node and usage events of every tick."""
        publish_prices(bootstrap, topics)
        out = producer(bootstrap)
        stats = Published()
        for tick in self.ticks:
            for short, key, value in tick.events:
                out.send(topics.name(short), key=key, value=value)
                stats.events += 1
        out.flush(timeout=300)
        out.close()
        return stats

    def publish_samples(self, bootstrap: str, topics: Topics) -> Published:
        out = producer(bootstrap)
        stats = Published()
        for tick in self.ticks:
            for key, value in tick.batches:
                out.send(topics.samples, key=key, value=value)
                stats.messages += 1
                stats.samples += fleet_samples(value)
                stats.bytes += len(value)
        out.flush(timeout=300)
        out.close()
        return stats


def running_system(
    rig: Rig,
    backlog: Backlog,
    prefix: str,
    group_id: str,
    *,
    partitions: int = 1,
    source_root: Path = ROOT,
    extra_env: dict[str, str] | None = None,
    samples: bool = True,
) -> tuple[Store, Published]:
    """A fresh store and topic set, as a running system has them when a worker (re)starts:
    metadata published and known to the store, the worker's correction progress recorded
    (a worker of `group_id` ran once and stopped); then the backlog of samples, unread
    (unless `samples` is false: a live benchmark publishes them on the clock)."""
    topics = rig.add_topics(prefix, partitions)
    backlog.publish_metadata(rig.broker.bootstrap, topics)
    store = rig.new_store(source_root)
    with workers(
        1,
        rig,
        store,
        prefix=prefix,
        group_id=group_id,
        source_root=source_root,
        extra_env=extra_env,
        name="warm-up",
    ) as (worker,):
        worker.wait_ready()
        if _has_table(store, "correction_progress"):
            # Its take-over redoes every correction the metadata calls for: a new system's.
            wait_for(
                lambda: store.count("SELECT count() FROM gpuledger.correction_progress"),
                600,
                "the warm-up worker's correction progress",
                worker,
            )
    published = backlog.publish_samples(rig.broker.bootstrap, topics) if samples else Published()
    return store, published


def _has_table(store: Store, name: str) -> bool:
    return bool(
        store.count(
            f"SELECT count() FROM system.tables WHERE database = 'gpuledger' AND name = '{name}'"
        )
    )


def fleet_samples(value: bytes) -> int:
    return value.count(b'"gpu_uuid"')


class Worker:
    """`gpuledger worker` as a child process, with the settings a benchmark gives it."""

    def __init__(
        self,
        bootstrap: str,
        store: Store,
        data_dir: Path,
        *,
        prefix: str,
        group_id: str,
        source_root: Path = ROOT,
        extra_env: dict[str, str] | None = None,
    ) -> None:
        data_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = data_dir / "worker.log"
        env = dict(os.environ)
        env.update(
            GPULEDGER_BOOTSTRAP=bootstrap,
            GPULEDGER_STORE=store.url,
            GPULEDGER_DATA_DIR=str(data_dir),
            GPULEDGER_TOPIC_PREFIX=prefix,
            GPULEDGER_GROUP_ID=group_id,
            PYTHONUNBUFFERED="1",
            PYTHONPATH=str(source_root),
        )
        env.update(extra_env or {})
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "gpuledger.cli", "worker"],
                env=env,
                cwd=source_root,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=die_with_parent,
            )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def wait_ready(self, timeout_s: float = 90.0) -> None:
        wait_for(lambda: "worker ready" in self.log(), timeout_s, "the worker to be ready", self)

    def assigned(self) -> bool:
        """True once the worker's last assignment gave it samples partitions."""
        found = re.findall(r"samples partitions assigned: \[([^\]]*)\]", self.log())
        return bool(found and found[-1].strip())

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def wait_for(
    probe: Callable[[], Any], timeout_s: float, what: str, worker: Worker | None = None
) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = probe()
        if value:
            return value
        if worker is not None and worker.proc.poll() is not None:
            tail = worker.log()[-3000:]
            raise RuntimeError(f"the worker exited while waiting for {what}:\n{tail}")
        time.sleep(0.1)
    tail = worker.log()[-3000:] if worker is not None else ""
    raise TimeoutError(f"timed out after {timeout_s} s waiting for {what}\n{tail}")


@dataclass(frozen=True)
class Point:
    wall: float
    rows: int
    cpu: tuple[float, ...]  # CPU seconds of each watched process
    machine_cpu: float
    started: bool


def watch(
    count: Callable[[], int],
    expected: int,
    pids: Sequence[int],
    *,
    timeout_s: float,
    started: Callable[[], bool] = lambda: True,
    every_s: float = 0.1,
    alive: Callable[[], bool] = lambda: True,
) -> list[Point]:
    """Poll a row count until it reaches `expected`; the points, with CPU seconds.

    `started` says when the consumer has its partitions (the clock of a run starts there:
    a consumer group's join is not throughput)."""
    points: list[Point] = []
    deadline = time.monotonic() + timeout_s
    is_started = False
    while True:
        is_started = is_started or started()
        rows = count()
        points.append(
            Point(
                time.monotonic(),
                rows,
                tuple(cpu_seconds(p) for p in pids),
                machine_cpu_seconds(),
                is_started,
            )
        )
        if rows >= expected:
            return points
        if time.monotonic() > deadline or not alive():
            raise TimeoutError(f"{rows:,} of {expected:,} rows after {timeout_s} s")
        time.sleep(every_s)


@dataclass(frozen=True)
class Window:
    """A run from its start (the consumer holds its partitions) to its last row visible."""

    rows: int
    seconds: float
    cpu: tuple[float, ...]
    machine_cpu: float
    startup_s: float  # from the start to the first row visible (within `seconds`)

    @property
    def rate(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else 0.0

    def per_cpu_second(self, which: int = 0) -> float:
        return self.rows / self.cpu[which] if self.cpu[which] > 0 else 0.0


def window(points: Sequence[Point]) -> Window:
    """From the start to the last point (every row visible): the take-over of partitions,
    every fetch and decode, the first insert and the tail (samples held for their grace)
    all count. A worker that reads a whole backlog before it stores anything is measured
    over all of its work, not over its last inserts."""
    started = next(p for p in points if p.started)
    first_rows = next(p for p in points if p.started and p.rows > started.rows)
    end = points[-1]
    return Window(
        rows=end.rows - started.rows,
        seconds=end.wall - started.wall,
        cpu=tuple(b - a for a, b in zip(started.cpu, end.cpu, strict=True)),
        machine_cpu=end.machine_cpu - started.machine_cpu,
        startup_s=first_rows.wall - started.wall,
    )


def median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


def spread(values: Sequence[float], fmt: str = ",.0f") -> str:
    """'median (min–max, ±x %)' of repeated measurements."""
    ordered = sorted(values)
    mid = median(ordered)
    if len(ordered) == 1:
        return f"{mid:{fmt}} (1 run)"
    half = (ordered[-1] - ordered[0]) / 2
    noise = f"±{100 * half / mid:.0f} %" if mid else "±?"
    return f"{mid:{fmt}} ({ordered[0]:{fmt}}–{ordered[-1]:{fmt}}, {noise})"


@contextlib.contextmanager
def workers(
    count: int,
    rig: Rig,
    store: Store,
    *,
    prefix: str,
    group_id: str,
    source_root: Path = ROOT,
    extra_env: dict[str, str] | None = None,
    name: str = "worker",
) -> Iterator[list[Worker]]:
    started = [
        Worker(
            rig.broker.bootstrap,
            store,
            rig.tmp / f"{prefix}{group_id}-{name}-{i}",
            prefix=prefix,
            group_id=group_id,
            source_root=source_root,
            extra_env=extra_env,
        )
        for i in range(count)
    ]
    try:
        yield started
    finally:
        for worker in started:
            worker.stop()
