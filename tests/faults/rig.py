"""The fault tests' rig: a real broker, a real store, real `gpuledger worker` processes, an
agent-like sender, and the count of what reached the store.

Every scenario prints one row of the fault table (scenario, sent, stored, duplicated, lost,
dead-lettered); `conftest.py` prints the whole table at the end of the run.
"""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from clickhouse_connect.driver.client import Client

from gpuledger.broker import EmbeddedBroker, ensure_topics
from gpuledger.children import freeze
from gpuledger.schema.messages import PriceEntry, PricingModel
from gpuledger.schema.migrate import migrate
from gpuledger.schema.topics import Topics
from gpuledger.store import connect, ensure_store, read_store_file, stop_owned_stores
from tests.support import (
    H100,
    GiB,
    Sender,
    WorkerProcess,
    env_for,
    gpu_sample,
    rows,
    sample_record,
    scalar,
    wait_until,
)

T0 = 1_767_225_600.0  # 2026-01-01T00:00:00Z: event time only
USD_PER_H100_HOUR = 4.0  # the one price every rig starts with: */*/H100/on_demand
SESSION_TIMEOUT_MS = 6000


@dataclass(frozen=True)
class FaultRow:
    scenario: str
    sent: int
    stored: int
    duplicated: int
    lost: int
    dead_lettered: int

    HEADER = ("scenario", "sent", "stored", "duplicated", "lost", "dead-lettered")

    def cells(self) -> tuple[str, ...]:
        return (
            self.scenario,
            f"{self.sent:,}",
            f"{self.stored:,}",
            str(self.duplicated),
            str(self.lost),
            f"{self.dead_lettered:,}",
        )


FAULT_TABLE: list[FaultRow] = []


def format_table(table: list[FaultRow]) -> str:
    lines = [FaultRow.HEADER, *(r.cells() for r in table)]
    widths = [max(len(line[i]) for line in lines) for i in range(len(FaultRow.HEADER))]
    out = []
    for n, line in enumerate(lines):
        pairs = enumerate(zip(line, widths, strict=True))
        cells = [c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in pairs]
        out.append("| " + " | ".join(cells) + " |")
        if n == 0:
            out.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(out)


def sample(
    gpu: str, node: str, ts: float, *, util: float = 0.8, name: str = H100
) -> dict[str, Any]:
    """A busy GPU's sample, as JSON (unchecked: fault tests send out-of-range values too)."""
    built = gpu_sample(
        gpu, ts, node=node, gpu_name=name, checked=False, util_sm=util, util_mem=0.2,
        mem_used_bytes=8 * GiB, mem_total_bytes=80 * GiB, power_w=350.0, power_limit_w=700.0,
        temp_c=55.0,
    )  # fmt: skip
    return sample_record(built)


@dataclass(frozen=True)
class Fleet:
    """`nodes` nodes of `gpus` GPUs each, named after `prefix`; one batch per node a second."""

    prefix: str
    nodes: int
    gpus: int

    def node(self, n: int) -> str:
        return f"{self.prefix}-node{n:03d}"

    def gpu(self, n: int, g: int) -> str:
        return f"GPU-{self.prefix}-{n:03d}-{g}"

    def batches(self, t_from: float, seconds: int) -> Iterator[tuple[str, bytes]]:
        """(node, SampleBatch bytes) for every node and event second, in time order."""
        for s in range(seconds):
            ts = t_from + s
            for n in range(self.nodes):
                node = self.node(n)
                samples = [sample(self.gpu(n, g), node, ts) for g in range(self.gpus)]
                yield node, orjson.dumps({"v": 1, "node": node, "samples": samples})

    def samples_in(self, seconds: int) -> int:
        return seconds * self.nodes * self.gpus


class Rig:
    """One broker, one store, the topics and the price; workers started on demand."""

    def __init__(self, tmp: Path, *, partitions: int = 1) -> None:
        self.tmp = tmp
        tmp.mkdir(parents=True, exist_ok=True)
        self.topics = Topics()
        self.broker = EmbeddedBroker().start()
        ensure_topics(self.broker.bootstrap, self.topics, partitions)
        self.store_path = (tmp / "store").resolve()
        ensure_store(self.store_path)
        self.store_url = f"chdb://{self.store_path}"
        self.client: Client = connect(self.store_url, start=False)
        migrate(self.client)
        self.sender = Sender(self.broker.bootstrap, self.topics)
        price = PriceEntry(
            provider="*",
            region="*",
            gpu_model="H100",
            pricing_model=PricingModel.on_demand,
            usd_per_gpu_hour=USD_PER_H100_HOUR,
        )
        self.sender.send("prices", price.key, price)
        self.sender.flush()
        self.workers: list[WorkerProcess] = []

    # -- processes -------------------------------------------------------------------
    def worker(self, name: str = "w1", **env: str) -> WorkerProcess:
        data_dir = self.tmp / name
        data_dir.mkdir(exist_ok=True)
        environment = env_for(
            self.broker.bootstrap,
            self.store_url,
            data_dir,
            GPULEDGER_SESSION_TIMEOUT_MS=str(SESSION_TIMEOUT_MS),
            **env,
        )
        worker = WorkerProcess(environment, self.tmp / f"{name}.log")
        self.workers.append(worker)
        return worker.start()

    def store_pid(self) -> int:
        info = read_store_file(self.store_path)
        assert info is not None, f"no store file in {self.store_path}"
        return info.pid

    def pause_store(self) -> None:
        freeze(self.store_pid())

    def resume_store(self) -> None:
        os.kill(self.store_pid(), signal.SIGCONT)

    def close(self) -> None:
        for worker in self.workers:
            worker.stop(signal.SIGKILL)
        with_errors: list[BaseException] = []
        for step in (self.sender.close, self.broker.stop, self.client.close):
            try:
                step()
            except Exception as exc:  # keep closing the rest
                with_errors.append(exc)
        stop_owned_stores(self.store_path)

    # -- sending ---------------------------------------------------------------------
    def send_batches(self, batches: Iterator[tuple[str, bytes]]) -> int:
        sent = 0
        for node, value in batches:
            self.sender.send("samples", node, value)
            sent += 1
        self.sender.flush()
        return sent

    def stream(self, fleet: Fleet, t_from: float, seconds: int, per_wall_s: float) -> Stream:
        """Send `seconds` of the fleet's event time in the background, `per_wall_s` event
        seconds per wall second, as agents would."""
        return Stream(self, fleet, t_from, seconds, per_wall_s).start()

    # -- counting --------------------------------------------------------------------
    def tally(self, gpu_prefix: str) -> tuple[int, int, int]:
        """(stored, duplicated, partial) samples of the GPUs named `gpu_prefix…`.

        A sample is stored once when its live rows cover exactly its GPU-second: the shares
        of its rows, summed with their signs, make 1. More is a duplicate; other amounts
        (a lone cancel, half a split) are partial and count as damage too.
        """
        found = rows(
            self.client,
            """SELECT countIf(abs(gs - 1) < 1e-3), countIf(gs > 1 + 1e-3),
                      countIf(abs(gs - 1) >= 1e-3 AND gs <= 1 + 1e-3 AND abs(gs) > 1e-3)
               FROM (SELECT gpu_uuid, ts, sum(duration_s * share * sign) AS gs
                     FROM gpuledger.cost_facts
                     WHERE startsWith(gpu_uuid, {p:String})
                     GROUP BY gpu_uuid, ts)""",
            p=gpu_prefix,
        )
        stored, duplicated, partial = found[0]
        return int(stored), int(duplicated), int(partial)

    def dollars(self, gpu_prefix: str, node_prefix: str) -> tuple[float, float]:
        """(Σ cost in cost_facts, Σ cost in the minute rollup) of these GPUs and nodes."""
        facts = scalar(
            self.client,
            "SELECT sum(cost_usd * sign) FROM gpuledger.cost_facts "
            "WHERE startsWith(gpu_uuid, {p:String})",
            p=gpu_prefix,
        )
        rollup = scalar(
            self.client,
            "SELECT sum(cost_usd) FROM gpuledger.cost_minute WHERE startsWith(node, {n:String})",
            n=node_prefix,
        )
        return float(facts or 0.0), float(rollup or 0.0)

    def dead_letters(self, topic: str) -> tuple[int, int]:
        """(distinct messages or samples dead-lettered, rows in `deadletters`) for a topic."""
        found = rows(
            self.client,
            """SELECT uniqExact(partition, offset, ifNull(idx, 4294967295)), count()
               FROM gpuledger.deadletters WHERE topic = {t:String}""",
            t=topic,
        )
        return int(found[0][0]), int(found[0][1])

    def wait_stored(self, gpu_prefix: str, sent: int, timeout_s: float = 120.0) -> None:
        wait_until(
            lambda: self.tally(gpu_prefix)[0] >= sent,
            timeout_s=timeout_s,
            every_s=0.5,
            what=f"{sent:,} samples of {gpu_prefix} stored",
        )

    def row(
        self,
        scenario: str,
        fleet: Fleet,
        sent: int,
        *,
        dead_lettered: int = 0,
    ) -> FaultRow:
        """Count, record and print the scenario's row of the fault table."""
        prefix = f"GPU-{fleet.prefix}-"
        stored, duplicated, partial = self.tally(prefix)
        row = FaultRow(
            scenario=scenario,
            sent=sent,
            stored=stored,
            duplicated=duplicated + partial,
            lost=sent - stored,
            dead_lettered=dead_lettered,
        )
        FAULT_TABLE.append(row)
        print("\n" + format_table([row]))
        return row

    def assert_exact(self, fleet: Fleet, row: FaultRow, usd_per_gpu_hour: float) -> None:
        """No sample lost or doubled, and the dollars agree in the facts and the rollups."""
        assert row.duplicated == 0, f"{row.duplicated} samples doubled or partial: {row}"
        assert row.lost == 0, f"{row.lost} samples lost: {row}"
        facts, rollup = self.dollars(f"GPU-{fleet.prefix}-", f"{fleet.prefix}-node")
        expected = row.sent * usd_per_gpu_hour / 3600
        assert abs(facts - expected) <= 1e-9 * expected, (facts, expected)
        assert abs(rollup - expected) <= 1e-9 * expected, (rollup, expected)

    def assigned_partitions(self, worker: WorkerProcess) -> list[int]:
        """The samples partitions `worker` said it was assigned last."""
        found = re.findall(r"samples partitions assigned: \[([\d, ]*)\]", worker.log())
        assert found, "the worker never logged an assignment"
        return [int(p) for p in found[-1].replace(" ", "").split(",") if p]


@dataclass
class Stream:
    """A background sender of a fleet's samples, paced in wall time."""

    rig: Rig
    fleet: Fleet
    t_from: float
    seconds: int
    per_wall_s: float
    sent: int = 0
    error: BaseException | None = None
    _thread: threading.Thread | None = field(default=None, repr=False)

    def start(self) -> Stream:
        self._thread = threading.Thread(target=self._run, name="stream", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            started = time.monotonic()
            per_second = self.fleet.nodes
            for i, (node, value) in enumerate(self.fleet.batches(self.t_from, self.seconds)):
                self.rig.sender.send("samples", node, value)
                self.sent += 1
                if (i + 1) % per_second == 0:
                    ahead = started + (i + 1) / per_second / self.per_wall_s - time.monotonic()
                    if ahead > 0:
                        time.sleep(ahead)
            # An agent keeps what it could not send yet; here, the producer's buffer does.
            self.rig.sender.producer.flush(timeout=180)
        except BaseException as exc:  # reported by join()
            self.error = exc

    def join(self, timeout_s: float = 180.0) -> int:
        """Wait for the last message; return how many samples were sent."""
        assert self._thread is not None
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            raise AssertionError(f"the stream did not finish within {timeout_s} s")
        if self.error is not None:
            raise AssertionError(f"the stream failed: {self.error!r}") from self.error
        return self.sent * self.fleet.gpus


def until(probe: Callable[[], bool], timeout_s: float, what: str) -> None:
    wait_until(probe, timeout_s=timeout_s, every_s=0.1, what=what)
