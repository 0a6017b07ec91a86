"""The agent loop: read every interval, publish one `SampleBatch` per node, stop cleanly.

Two sources, one loop:

- a real node: `pynvml` on this machine's GPUs, ticks aligned to wall-clock seconds;
- a simulated fleet (`simulate=SCENARIO`): one process plays every node of the scenario (or
  `nodes`), and publishes the scenario's job, node and usage events at their time too.
  Scenario time is the wall clock, or runs `speed` times faster from `start` for replays;
  every message is stamped with scenario time, so a fast replay is the same history.

`generate()` yields what the live loop would publish over a time range without sleeping;
both go through `AgentCore.step`, so they cannot disagree. This module imports neither Faust
nor chdb: the agent must stay small.
"""

from __future__ import annotations

import logging
import math
import signal
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

import pynvml
from kafka.errors import KafkaError
from pydantic import BaseModel

from agents.nvml import NvmlReader, ReadStats
from agents.publisher import Publisher
from agents.scenario import Scenario, ScenarioError
from agents.simnvml import SimulatedNvml
from schema.messages import NodeInfo, SampleBatch
from schema.topics import DEFAULT_PREFIX, Topics

log = logging.getLogger(__name__)

DEMO_SCENARIO = Path(__file__).parent / "scenarios" / "demo.toml"

# (topic short name, key, message): what the agent publishes.
Record = tuple[str, str, BaseModel]


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

    @classmethod
    def simulated(
        cls, scenario: Scenario, nodes: Sequence[str] = (), interval_s: float = 1.0
    ) -> AgentCore:
        """Every node of `scenario` (or `nodes`) on simulated NVML at the core's scenario time."""
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

    def step(self, previous: float, now: float) -> tuple[list[Record], ReadStats]:
        """What to publish at tick `now`: events in [previous, now), then each node's batch."""
        self.scenario_time = now
        records: list[Record] = self._pending
        self._pending = []
        if self.scenario is not None:
            records.extend(self.scenario.events_between(previous, now, self.readers.keys()))
        total = ReadStats()
        for node, reader in self.readers.items():
            samples, stats = reader.read(now)
            total.merge(stats)
            if samples:
                batch = SampleBatch(node=node, samples=[s.model_dump(mode="json") for s in samples])
                records.append(("samples", node, batch))
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
    previous = t0
    k = 1
    while (now := t0 + k * interval_s) <= t1 + 1e-9:
        records, _ = core.step(previous, now)
        yield from records
        previous = now
        k += 1


# --- the live loop -----------------------------------------------------------------------


def _real_core(node_name: str | None, interval_s: float, node_info: NodeInfo | None) -> AgentCore:
    name = node_name or socket.gethostname()
    reader = NvmlReader(pynvml, name, interval_s=interval_s)
    try:
        reader.init()
    except pynvml.NVMLError as exc:
        raise AgentError(
            f"NVML is not available on this machine: pynvml.nvmlInit() failed with "
            f"'{exc}' (it looks for the NVIDIA driver's libnvidia-ml.so.1 on the library "
            "path). On a GPU node, install the NVIDIA driver or mount it into the container; "
            "without GPUs, simulate a fleet: --simulate agents/scenarios/demo.toml"
        ) from exc
    driver = reader.nvml_query("nvmlSystemGetDriverVersion", default="?")
    log.info("reading NVML on %s (driver %s)", name, driver)
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


def run_agent(
    bootstrap: str,
    *,
    simulate: str | Path | None = None,
    nodes: Sequence[str] = (),
    node_name: str | None = None,
    node_info: NodeInfo | None = None,
    topic_prefix: str = DEFAULT_PREFIX,
    interval_s: float = 1.0,
    speed: float = 1.0,
    start: float | None = None,
    duration_s: float | None = None,
    log_every_s: float = 10.0,
    stop: threading.Event | None = None,
) -> int:
    """Run the agent until `duration_s` of scenario time has passed, or SIGTERM/SIGINT/`stop`.

    Returns 0 when Kafka acknowledged everything, 1 when some records were not delivered.
    Raises `AgentError` when it cannot start (no NVML, bad scenario, Kafka unreachable).
    """
    if interval_s <= 0:
        raise AgentError(f"interval_s must be > 0, got {interval_s}")
    if speed <= 0:
        raise AgentError(f"speed must be > 0, got {speed}")
    if simulate is None and (speed != 1.0 or start is not None or nodes):
        raise AgentError("--speed, --start and --node apply to a simulated fleet: add --simulate")
    stop = stop or threading.Event()

    # Ticks fall on whole multiples of the interval, in wall time and in scenario time.
    wall_start = math.ceil(time.time() / interval_s) * interval_s
    scenario_start = wall_start if start is None else float(start)
    if simulate is not None:
        try:
            scenario = Scenario.load(simulate, origin=scenario_start)
        except ScenarioError as exc:
            raise AgentError(str(exc)) from exc
        core = AgentCore.simulated(scenario, nodes, interval_s)
        what = f"scenario {scenario.name} ({', '.join(core.readers)})"
    else:
        core = _real_core(node_name, interval_s, node_info)
        what = f"node {next(iter(core.readers))}"

    try:
        publisher = Publisher(bootstrap, Topics(topic_prefix))
    except KafkaError as exc:
        raise AgentError(
            f"cannot reach Kafka at {bootstrap!r}: {exc!r}; check GPULEDGER_BOOTSTRAP"
        ) from exc
    log.info(
        "agent started: %s, every %s s%s, publishing to %s",
        what,
        interval_s,
        f" at {speed}x from {scenario_start}" if simulate is not None else "",
        bootstrap,
    )
    batches = samples = events = 0
    errors = ReadStats()
    last_log = time.monotonic()
    previous = scenario_start
    k = 1
    with _Stopper(stop):
        try:
            while not stop.is_set():
                now = scenario_start + k * interval_s
                if duration_s is not None and now - scenario_start > duration_s + 1e-9:
                    break
                due = wall_start + k * interval_s / speed
                if stop.wait(max(0.0, due - time.time())):
                    break
                if simulate is None and time.time() - due > interval_s:
                    # Real hardware: after a stall read now, not the ticks we missed.
                    k = math.floor((time.time() - wall_start) / interval_s)
                    now = scenario_start + k * interval_s
                records, stats = core.step(previous, now)
                errors.merge(stats)
                for topic, key, message in records:
                    publisher.publish(topic, key, message)
                    if topic == "samples":
                        batches += 1
                        samples += len(message.samples) if isinstance(message, SampleBatch) else 0
                    else:
                        events += 1
                previous = now
                k += 1
                if time.monotonic() - last_log >= log_every_s:
                    last_log = time.monotonic()
                    log.info(
                        "agent: %d samples in %d batches, %d events sent, %d failed; "
                        "scenario time %.0f; NVML errors %s",
                        samples,
                        batches,
                        events,
                        publisher.stats.failed,
                        now,
                        dict(errors.errors_by_call) or "none",
                    )
        finally:
            final = publisher.close()
            for reader in core.readers.values():
                reader.shutdown()
    log.info(
        "agent stopped: %d samples in %d batches and %d events; %d delivered, %d not delivered",
        samples,
        batches,
        events,
        final.delivered,
        final.failed,
    )
    return 0 if final.failed == 0 else 1
