"""The agent loop: read every interval, publish one `SampleBatch` per node, stop cleanly.

Two sources, one loop:

- a real node: `pynvml` on this machine's GPUs, ticks aligned to wall-clock seconds;
- a simulated fleet (`simulate=SCENARIO`): one process plays every node of the scenario (or
  `nodes`), and publishes the scenario's job, node and usage events at their time too.
  Scenario time is the wall clock, or runs `speed` times faster from `start` for replays;
  every message is stamped with scenario time, so a fast replay is the same history.

`generate()` yields what the live loop would publish over a time range without sleeping;
both read through `AgentCore.read`, so they cannot disagree (the live loop spools
`AgentCore.step_encoded`: `step`'s records, written straight to their wire bytes). The live
loop never talks to Kafka itself: it appends every record to the on-disk spool, which a
sender thread drains to Kafka (`agents/spool.py`, `agents/publisher.py`), and it serves
`/metrics` when asked (`agents/metrics.py`). This module imports neither Faust nor chdb: the
agent must stay small.
"""

from __future__ import annotations

import logging
import math
import shutil
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

import pynvml
from pydantic import BaseModel

from gpuledger.agents.attribution import Attributor, ProcAttributor
from gpuledger.agents.config import AgentConfig
from gpuledger.agents.kubelet import KubeletPods, PodLabelAttributor
from gpuledger.agents.metrics import AgentMetrics, serve_metrics
from gpuledger.agents.nvml import NvmlReader, ReadStats
from gpuledger.agents.publisher import SpoolSender, encode, encode_samples
from gpuledger.agents.spool import Spool, SpoolError
from gpuledger.schema.messages import GpuSample, NodeInfo, SampleBatch
from gpuledger.schema.topics import Topics

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    # the simulation is imported only to simulate: a node agent stays small
    from gpuledger.agents.sim.engine import Scenario

log = logging.getLogger(__name__)

DEMO_SCENARIO = Path(__file__).parent / "scenarios" / "demo.toml"

# (topic short name, key, message): what the agent publishes.
Record = tuple[str, str, BaseModel]
# (topic short name, key, the message's wire bytes, GPU samples in it): the same, encoded.
EncodedRecord = tuple[str, str, bytes, int]


class AgentError(RuntimeError):
    """The agent cannot start; the message says what was looked for and what to do."""


class AgentCore:
    """Readers for one or more nodes, plus the scenario's events when simulating."""

    def __init__(
        self,
        readers: dict[str, NvmlReader],
        scenario: Scenario | None = None,
        extra_events: Sequence[Record] = (),
    ) -> None:
        self.readers = readers
        self.scenario = scenario
        self.scenario_time = scenario.origin if scenario is not None else 0.0
        self._pending = list(extra_events)
        # Each node's last read, for the metrics endpoint.
        self.last: dict[str, tuple[list[GpuSample], ReadStats]] = {}

    @classmethod
    def simulated(
        cls, scenario: Scenario, nodes: Sequence[str] = (), interval_s: float = 1.0
    ) -> AgentCore:
        """Every node of `scenario` (or `nodes`) on simulated NVML at the core's scenario time."""
        from gpuledger.agents.sim.nvml import SimulatedNvml

        chosen = list(nodes) or scenario.node_names
        unknown = [n for n in chosen if n not in scenario.node_names]
        if unknown:
            raise AgentError(
                f"node {unknown[0]!r} is not in scenario {scenario.name!r}; "
                f"its nodes are {', '.join(scenario.node_names)}"
            )
        core = cls({}, scenario)
        for node in chosen:
            sim = SimulatedNvml(scenario, node, core.clock)
            sim.nvmlInit()
            core.readers[node] = NvmlReader(
                sim, node, core.clock, interval_s=interval_s, attribute=sim.attribute
            )
        return core

    def clock(self) -> float:
        return self.scenario_time

    def start(self, now: float) -> None:
        """Read once at `now` and keep nothing: GPM measures between two samples, so the
        first interval's SM activity needs a sample taken when the interval begins."""
        self.scenario_time = now
        for reader in self.readers.values():
            reader.read(now)

    def read(
        self, previous: float, now: float
    ) -> tuple[list[Record], dict[str, list[GpuSample]], ReadStats]:
        """Tick `now`: the events in [previous, now), each node's samples, the read stats."""
        self.scenario_time = now
        events: list[Record] = self._pending
        self._pending = []
        if self.scenario is not None:
            events.extend(self.scenario.events_between(previous, now, self.readers.keys()))
        total = ReadStats()
        batches: dict[str, list[GpuSample]] = {}
        for node, reader in self.readers.items():
            samples, stats = reader.read(now)
            self.last[node] = (samples, stats)
            total.merge(stats)
            if samples:
                batches[node] = samples
        return events, batches, total

    def step(self, previous: float, now: float) -> tuple[list[Record], ReadStats]:
        """What to publish at tick `now`: events in [previous, now), then each node's batch."""
        events, batches, total = self.read(previous, now)
        records = list(events)
        for node, samples in batches.items():
            batch = SampleBatch(node=node, samples=[s.model_dump(mode="json") for s in samples])
            records.append(("samples", node, batch))
        return records, total

    def step_encoded(self, previous: float, now: float) -> tuple[list[EncodedRecord], ReadStats]:
        """`step`'s records as `encode` writes them, each batch written straight from its
        samples (`encode_samples`): what the live loop spools."""
        events, batches, total = self.read(previous, now)
        records: list[EncodedRecord] = []
        for topic, key, message in events:
            count = len(message.samples) if isinstance(message, SampleBatch) else 0
            records.append((topic, key, encode(message), count))
        for node, samples in batches.items():
            records.append(("samples", node, encode_samples(node, samples), len(samples)))
        return records, total


def generate(
    scenario: Scenario,
    t0: float,
    t1: float,
    interval_s: float = 1.0,
    nodes: Sequence[str] = (),
) -> Iterator[Record]:
    """The records a live simulated agent publishes for ticks in (t0, t1], without sleeping.

    The first tick is `t0 + interval_s`, whose batches cover `[t0, t0 + interval_s)`.
    """
    core = AgentCore.simulated(scenario, nodes, interval_s)
    core.start(t0)
    previous = t0
    k = 1
    while (now := t0 + k * interval_s) <= t1 + 1e-9:
        records, _ = core.step(previous, now)
        yield from records
        previous = now
        k += 1


# --- the live loop -----------------------------------------------------------------------


def _nvml_library_path() -> str | None:
    """Where the loaded libnvidia-ml.so.1 lives, for the log (from /proc/self/maps)."""
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                if "libnvidia-ml.so" in line:
                    return line.split(None, 5)[-1].strip()
    except OSError:
        pass
    return None


def _nvml_init_error(exc: pynvml.NVMLError) -> AgentError:
    simulate = "without GPUs, simulate a fleet instead: --simulate agents/scenarios/demo.toml"
    if isinstance(exc, pynvml.NVMLError_LibraryNotFound):
        return AgentError(
            "NVML is not available: the NVIDIA driver's libnvidia-ml.so.1 was not found on the "
            "library path (ldconfig cache, LD_LIBRARY_PATH). On a GPU node install the NVIDIA "
            "driver; in a container, run it with the NVIDIA container runtime (or mount the "
            f"driver's libraries and add them to LD_LIBRARY_PATH); {simulate}"
        )
    if isinstance(exc, pynvml.NVMLError_DriverNotLoaded):
        return AgentError(
            f"NVML is not available: libnvidia-ml.so.1 was loaded from "
            f"{_nvml_library_path() or 'the library path'}, but nvmlInit() says the NVIDIA "
            "kernel driver is not loaded ('Driver Not Loaded'): check `nvidia-smi` and "
            f"`lsmod | grep nvidia` on the node; {simulate}"
        )
    if isinstance(exc, pynvml.NVMLError_NoPermission):
        return AgentError(
            "NVML is not available: nvmlInit() was refused ('Insufficient Permissions'); the "
            "agent needs read-write access to /dev/nvidiactl and /dev/nvidia* (run it as root "
            "or in the video group, or as a privileged DaemonSet)"
        )
    return AgentError(
        f"NVML is not available: nvmlInit() failed with '{exc}' (libnvidia-ml.so.1 from "
        f"{_nvml_library_path() or 'the library path'}); {simulate}"
    )


def _real_core(
    node_name: str | None,
    interval_s: float,
    node_info: NodeInfo | None,
    proc_root: Path,
    pods: KubeletPods | None,
) -> AgentCore:
    name = node_name or socket.gethostname()
    attribute: Attributor = ProcAttributor(proc_root)
    if pods is not None:
        attribute = PodLabelAttributor(attribute, pods)
    reader = NvmlReader(pynvml, name, interval_s=interval_s, attribute=attribute)
    try:
        reader.init()
    except pynvml.NVMLError as exc:
        raise _nvml_init_error(exc) from exc
    driver = reader.nvml_query("nvmlSystemGetDriverVersion", default="?")
    count = reader.nvml_query("nvmlDeviceGetCount", default=0)
    log.info(
        "reading NVML on %s: %d GPUs, driver %s, %s; processes from %s",
        name,
        count,
        driver,
        _nvml_library_path() or "libnvidia-ml.so.1",
        proc_root,
    )
    if not count:
        log.warning("NVML sees no GPU on %s: samples will be empty", name)
    events: list[Record] = []
    if node_info is not None:
        events.append(("nodes", node_info.node, node_info))
    return AgentCore({name: reader}, None, events)


class _Stopper:
    """SIGTERM and SIGINT set `event`; the previous handlers come back on exit."""

    def __init__(self, event: threading.Event) -> None:
        self.event = event
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _Stopper:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        log.info("signal %s: stopping after this tick", signal.Signals(signum).name)
        self.event.set()

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _open_spool(spool_dir: Path | None, max_bytes: int) -> tuple[Spool, bool]:
    """The spool, and whether it is a temporary one (no --spool-dir)."""
    temporary = spool_dir is None
    if spool_dir is None:
        spool_dir = Path(tempfile.mkdtemp(prefix="gpuledger-spool-"))
        log.warning(
            "no spool folder given: using %s, which a restarted agent will not find "
            "(give --spool-dir for records to survive a restart)",
            spool_dir,
        )
    try:
        return Spool(spool_dir, max_bytes), temporary
    except SpoolError as exc:
        raise AgentError(str(exc)) from exc


def _check(config: AgentConfig) -> None:
    if config.interval_s <= 0:
        raise AgentError(f"interval_s must be > 0, got {config.interval_s}")
    if config.speed <= 0:
        raise AgentError(f"speed must be > 0, got {config.speed}")
    if config.spool_max_bytes <= 0:
        raise AgentError(
            f"the spool's maximum size must be > 0 bytes, got {config.spool_max_bytes}"
        )
    if config.simulate is None and (
        config.speed != 1.0 or config.start is not None or config.nodes
    ):
        raise AgentError("--speed, --start and --node apply to a simulated fleet: add --simulate")


def _open_core(
    config: AgentConfig, scenario_start: float, pods: KubeletPods | None
) -> tuple[AgentCore, str]:
    """The readers (a simulated fleet or this node's NVML), and what they read, for the log."""
    if config.simulate is None:
        core = _real_core(
            config.node_name, config.interval_s, config.node_info, config.proc_root, pods
        )
        return core, f"node {next(iter(core.readers))}"
    from gpuledger.agents.sim.engine import Scenario
    from gpuledger.agents.sim.spec import ScenarioError

    try:
        scenario = Scenario.load(config.simulate, origin=scenario_start)
    except ScenarioError as exc:
        raise AgentError(str(exc)) from exc
    core = AgentCore.simulated(scenario, config.nodes, config.interval_s)
    return core, f"scenario {scenario.name} ({', '.join(core.readers)})"


def _counters(spool: Spool, sender: SpoolSender) -> Callable[[], dict[str, float]]:
    """The spool's and the sender's counters, as /metrics shows them."""

    def counters() -> dict[str, float]:
        s = spool.stats
        return {
            "gpuledger_agent_samples_sent": s.sent_samples,
            "gpuledger_agent_samples_spooled": s.delayed_samples,
            "gpuledger_agent_samples_dropped": s.dropped_samples,
            "gpuledger_agent_messages_sent": sender.stats.messages_sent,
            "gpuledger_agent_send_failures": sender.stats.send_failures,
            "gpuledger_agent_spool_backlog_samples": s.backlog_samples,
            "gpuledger_agent_spool_backlog_bytes": s.backlog_bytes,
            "gpuledger_agent_kafka_connected": float(sender.stats.connected),
            "gpuledger_agent_kafka_wait_seconds": (
                0.0
                if sender.stats.waiting_since is None
                else time.monotonic() - sender.stats.waiting_since
            ),
        }

    return counters


def _serve_metrics(config: AgentConfig, metrics: AgentMetrics) -> WSGIServer | None:
    if config.metrics_port is None:
        return None
    try:
        server, _ = serve_metrics(metrics, config.metrics_port, config.metrics_addr)
    except OSError as exc:
        raise AgentError(
            f"cannot serve /metrics on {config.metrics_addr}:{config.metrics_port}: "
            f"{exc.strerror}; choose another --metrics-port"
        ) from exc
    log.info("metrics on http://%s:%d/metrics", config.metrics_addr, server.server_port)
    return server


@dataclass
class _Totals:
    """What the loop has read so far, for the log."""

    batches: int = 0
    samples: int = 0
    events: int = 0
    errors: ReadStats = field(default_factory=ReadStats)


@dataclass
class _Live:
    """The running agent's parts; `close` stops them in order."""

    config: AgentConfig
    core: AgentCore
    spool: Spool
    temporary_spool: bool
    sender: SpoolSender
    metrics: AgentMetrics
    server: WSGIServer | None
    pods: KubeletPods | None
    totals: _Totals = field(default_factory=_Totals)
    topics: Topics = field(init=False)

    def __post_init__(self) -> None:
        self.topics = Topics(self.config.topic_prefix)

    def tick(self, previous: float, now: float) -> None:
        """Read tick `now` and append its events and batches to the spool."""
        records, stats = self.core.step_encoded(previous, now)
        self.totals.errors.merge(stats)
        for node, (read, node_stats) in self.core.last.items():
            self.metrics.observe(node, read, self.core.readers[node].devices, node_stats)
        for topic, key, value, count in records:
            self.spool.append(self.topics.name(topic), key.encode(), value, count)
            if topic == "samples":
                self.totals.batches += 1
                self.totals.samples += count
            else:
                self.totals.events += 1

    def log_progress(self, now: float) -> None:
        s, t = self.spool.stats, self.totals
        log.info(
            "agent: %d samples read in %d batches, %d events; %d samples sent, "
            "%d waiting in the spool, %d dropped (spool full); scenario time %.0f; "
            "NVML errors (NotSupported is usual on MIG) %s",
            t.samples,
            t.batches,
            t.events,
            s.sent_samples,
            s.backlog_samples,
            s.dropped_samples,
            now,
            dict(t.errors.errors) or "none",
        )

    def close(self) -> bool:
        """Drain for up to `drain_timeout_s`, stop everything; True when Kafka has it all."""
        drained = self.sender.stop(self.config.drain_timeout_s)
        self.spool.close()
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
        for reader in self.core.readers.values():
            reader.shutdown()
        if self.pods is not None:
            self.pods.close()
        if self.temporary_spool and drained:
            shutil.rmtree(self.spool.directory, ignore_errors=True)
        return drained

    def log_stopped(self, drained: bool) -> None:
        final, t, directory = self.spool.stats, self.totals, self.spool.directory
        log.info(
            "agent stopped: %d samples in %d batches and %d events; %d samples delivered, "
            "%d left in the spool %s, %d dropped (spool full)",
            t.samples,
            t.batches,
            t.events,
            final.sent_samples,
            final.backlog_samples,
            directory,
            final.dropped_samples,
        )
        if not drained:
            log.warning(
                "%d records (%d samples) wait in the spool %s: the agent sends them when it "
                "starts again with the same --spool-dir",
                final.backlog_records,
                final.backlog_samples,
                directory,
            )


def _start(config: AgentConfig, scenario_start: float) -> tuple[_Live, str]:
    """Every part of the agent, started; raises `AgentError` with nothing left running."""
    pods = None
    if config.kubelet_url is not None:
        pods = KubeletPods(config.kubelet_url, insecure_tls=config.kubelet_insecure_tls).start()
    try:
        core, what = _open_core(config, scenario_start, pods)
    except AgentError:
        if pods is not None:
            pods.close()
        raise
    spool, temporary_spool = _open_spool(config.spool_dir, config.spool_max_bytes)
    try:
        sender = SpoolSender(spool, config.bootstrap)
    except ValueError as exc:
        spool.close()
        raise AgentError(f"--bootstrap {config.bootstrap!r}: {exc}") from exc
    metrics = AgentMetrics(counters=_counters(spool, sender), pods=pods)
    try:
        server = _serve_metrics(config, metrics)
    except AgentError:
        spool.close()
        raise
    sender.start()
    live = _Live(config, core, spool, temporary_spool, sender, metrics, server, pods)
    return live, what


def _loop(live: _Live, stop: threading.Event, wall_start: float, scenario_start: float) -> None:
    """Tick every interval until `duration_s` of scenario time has passed or `stop` is set."""
    config = live.config
    interval_s = config.interval_s
    last_log = time.monotonic()
    previous = scenario_start
    live.core.start(scenario_start)
    k = 1
    while not stop.is_set():
        now = scenario_start + k * interval_s
        if config.duration_s is not None and now - scenario_start > config.duration_s + 1e-9:
            break
        due = wall_start + k * interval_s / config.speed
        if stop.wait(max(0.0, due - time.time())):
            break
        if config.simulate is None and time.time() - due > interval_s:
            # Real hardware: after a stall read now, not the ticks we missed.
            k = math.floor((time.time() - wall_start) / interval_s)
            now = scenario_start + k * interval_s
        live.tick(previous, now)
        previous = now
        k += 1
        if time.monotonic() - last_log >= config.log_every_s:
            last_log = time.monotonic()
            live.log_progress(now)


def run_agent(config: AgentConfig, stop: threading.Event | None = None) -> int:
    """Run the agent until `duration_s` of scenario time has passed, or SIGTERM/SIGINT/`stop`.

    Every record goes to the spool in `spool_dir` first; Kafka gets it from there, so an
    unreachable broker costs nothing but disk. On the way out the agent keeps sending for
    up to `drain_timeout_s`. Returns 0 when Kafka acknowledged everything, 1 when records
    are left in the spool (the next start sends them). Raises `AgentError` when it cannot
    start (no NVML, bad scenario, spool folder in use, metrics port taken). With
    `kubelet_url` (the kubelet's `/pods`), processes in pods get their pod's job labels and
    the metrics name pods, namespaces and containers.
    """
    _check(config)
    stop = stop or threading.Event()
    # Ticks fall on whole multiples of the interval, in wall time and in scenario time.
    wall_start = math.ceil(time.time() / config.interval_s) * config.interval_s
    scenario_start = wall_start if config.start is None else float(config.start)
    live, what = _start(config, scenario_start)
    log.info(
        "agent started: %s, every %s s%s, publishing to %s through the spool %s",
        what,
        config.interval_s,
        f" at {config.speed}x from {scenario_start}" if config.simulate is not None else "",
        config.bootstrap,
        live.spool.directory,
    )
    drained = False
    with _Stopper(stop):
        try:
            _loop(live, stop, wall_start, scenario_start)
        finally:
            drained = live.close()
    live.log_stopped(drained)
    return 0 if drained else 1
