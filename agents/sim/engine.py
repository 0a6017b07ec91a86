"""The fleet scenario engine: a simulated fleet as a pure function of scenario time.

A scenario file (TOML, format in `agents/scenarios/README.md`) names nodes, their GPUs (MIG
partitions included) and the jobs that run on them. `Scenario.hardware(node, t)` answers what
NVML would report at time `t`, and `Scenario.events_between(t0, t1)` the job, node and usage
messages a scheduler and an inference gateway would publish. Both depend only on the file,
the seed, the origin and `t`: the same inputs always give the same values, which tests and
replays rely on.
"""

from __future__ import annotations

import hashlib
import math
import uuid
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from gpuledger.agents.sim.generator import clamp, mix_key, uniform
from gpuledger.agents.sim.hardware import (
    MIB,
    Activity,
    Gpu,
    GpuState,
    MigState,
    NodeHardware,
    ProcessState,
    ProcessUtilSample,
    compile_gpus,
)
from gpuledger.agents.sim.jobs import (
    Job,
    Placement,
    Run,
    check_templates,
    compile_job,
    job_util,
    run_at,
    runs_between,
)
from gpuledger.agents.sim.spec import NodeSpec, ScenarioError, ScenarioFile, read_toml, validate
from gpuledger.schema.messages import JobEvent, JobState, NodeInfo, UsageEvent

# Per-process utilization samples land this often (NVML keeps a ring of recent samples);
# the phase keeps them off whole seconds so no sample sits exactly on a read boundary.
PROCESS_SAMPLE_PERIOD_S = 0.5
PROCESS_SAMPLE_PHASE_S = 0.123
# How far back the simulated driver's sample buffer reaches (a read with lastSeen = 0).
PROCESS_SAMPLE_BUFFER_S = 20.0
# GPM counters integrate at most this far back per step; an older part of a longer span counts
# at the rate after it (a feed or a reader that skipped many seconds).
GPM_SPAN_S = 600.0
HOST_CGROUP = "0::/user.slice/user-1000.slice/session-2.scope"


@dataclass
class Scenario:
    """A loaded scenario anchored at `origin` (epoch seconds where job offsets count from)."""

    file: ScenarioFile
    origin: float
    source: str = "<scenario>"
    _gpus: dict[str, tuple[Gpu, ...]] = field(default_factory=dict, repr=False)
    _jobs: dict[str, tuple[Job, ...]] = field(default_factory=dict, repr=False)

    # -- loading

    @classmethod
    def load(cls, path: str | Path, origin: float | None = None) -> Scenario:
        """Read a TOML scenario; `origin` overrides the file's `[scenario] origin`."""
        return cls.from_dict(read_toml(path), origin=origin, source=str(path))

    @classmethod
    def from_dict(
        cls, data: Mapping[str, Any], origin: float | None = None, source: str = "<scenario>"
    ) -> Scenario:
        spec = validate(data, source)
        if origin is None:
            origin = spec.scenario.origin
        if origin is None:
            raise ScenarioError(
                f"{source}: no origin: set [scenario] origin (epoch seconds) or pass origin="
            )
        scenario = cls(file=spec, origin=float(origin), source=source)
        scenario._compile()
        return scenario

    def _compile(self) -> None:
        seed = self.file.scenario.seed
        names = [n.name for n in self.file.nodes]
        duplicates = {n for n in names if names.count(n) > 1}
        if duplicates:
            raise ScenarioError(
                f"{self.source}: node names must be unique, got {sorted(duplicates)}"
            )
        for node in self.file.nodes:
            self._gpus[node.name] = compile_gpus(node, self.source)
        jobs: dict[str, list[Job]] = {n: [] for n in names}
        for number, spec in enumerate(self.file.jobs):
            where = f"{self.source}: jobs[{number}] ({spec.job_id})"
            if spec.node not in self._gpus:
                raise ScenarioError(f"{where}: node {spec.node!r} is not one of {names}")
            check_templates(where, spec)
            gpus = self._gpus[spec.node]
            for index in spec.gpus:
                if not 0 <= index < len(gpus):
                    raise ScenarioError(
                        f"{where}: gpus lists {index}, but {spec.node} has GPUs 0..{len(gpus) - 1}"
                    )
            if spec.mig_instance is not None:
                gpu = gpus[spec.gpus[0]]
                if not 0 <= spec.mig_instance < len(gpu.mig):
                    raise ScenarioError(
                        f"{where}: mig_instance {spec.mig_instance} does not exist on "
                        f"{spec.node} GPU {gpu.index} (MIG instances: {len(gpu.mig)}); "
                        "partition it with mig = [...]"
                    )
            elif any(gpus[i].mig_enabled for i in spec.gpus):
                raise ScenarioError(
                    f"{where}: a GPU in MIG mode runs jobs only inside an instance; "
                    "set mig_instance"
                )
            jobs[spec.node].append(compile_job(number, spec, seed, self.source))
        self._jobs = {n: tuple(js) for n, js in jobs.items()}

    # -- the fleet

    @property
    def name(self) -> str:
        return self.file.scenario.name

    @property
    def node_names(self) -> list[str]:
        return [n.name for n in self.file.nodes]

    def node(self, name: str) -> NodeSpec:
        for node in self.file.nodes:
            if node.name == name:
                return node
        raise KeyError(f"node {name!r} is not in scenario {self.name}; nodes: {self.node_names}")

    def gpus(self, node: str) -> tuple[Gpu, ...]:
        if node not in self._gpus:
            raise KeyError(
                f"node {node!r} is not in scenario {self.name}; nodes: {self.node_names}"
            )
        return self._gpus[node]

    @property
    def run_tag(self) -> str:
        """`{run}` in job ids: tells runs with different origins apart."""
        return f"{int(self.origin):x}"[-6:]

    # -- job timelines

    def _job_id(self, job: Job, cycle: int) -> str:
        return job.spec.job_id.format_map({"cycle": cycle, "run": self.run_tag})

    def _template(self, text: str | None, cycle: int) -> str | None:
        if text is None:
            return None
        return text.format_map({"cycle": cycle, "run": self.run_tag})

    # -- utilization model

    def _process_state(self, run: Run, p: Placement, second: int) -> ProcessState:
        job = run.job
        spec = job.spec
        util = job_util(run, p.position, second) * p.share
        mem_noise = uniform(job.key ^ 0x3E3, second)
        job_id = self._job_id(job, run.cycle)
        return ProcessState(
            pid=self._pid(run, p),
            name=p.name,
            kind=p.kind,
            job_id=job_id,
            used_memory_bytes=int(spec.mem_gb * p.share * 1024 * MIB),
            sm_util=util,
            mem_util=clamp(util * (0.55 + 0.1 * mem_noise)),
            env=self._environ(run, job_id),
            cgroup=self._cgroup(run, p),
            sm_active=util * job.sm_fill,
            tensor_share=job.tensor_share,
        )

    def _pid(self, run: Run, p: Placement) -> int:
        if p.pid is not None:
            return p.pid
        base = 2000 + mix_key(self.file.scenario.seed, "pid", run.job.number) % 900_000
        return base + (run.cycle % 1000) * 64 + p.process_index

    def _environ(self, run: Run, job_id: str) -> dict[str, str]:
        spec = run.job.spec
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/home/ml"}
        if spec.label_env:
            env["GPULEDGER_JOB_ID"] = job_id
            for var, value in (
                ("GPULEDGER_TEAM", spec.team),
                ("GPULEDGER_PROJECT", spec.project),
                ("GPULEDGER_JOB_TYPE", spec.job_type.value),
                ("GPULEDGER_EXPERIMENT_ID", self._template(spec.experiment_id, run.cycle)),
                ("GPULEDGER_MODEL", spec.model),
                ("GPULEDGER_ENVIRONMENT", spec.environment),
            ):
                if value:
                    env[var] = value
        for var, template in (spec.env or {}).items():
            env[var] = template.format_map({"cycle": run.cycle, "run": self.run_tag})
        return env

    def _cgroup(self, run: Run, p: Placement) -> str:
        runtime = run.job.spec.runtime
        if runtime == "host":
            return HOST_CGROUP
        seed = self.file.scenario.seed
        container = hashlib.sha256(
            repr((seed, run.job.number, run.cycle, p.process_index)).encode()
        ).hexdigest()
        if runtime == "docker":
            return f"0::/system.slice/docker-{container}.scope"
        pod_digest = hashlib.blake2b(repr((seed, run.job.number, run.cycle)).encode()).digest()
        pod = str(uuid.UUID(bytes=pod_digest[:16]))
        return (
            "0::/kubepods.slice/kubepods-burstable.slice/"
            f"kubepods-burstable-pod{pod.replace('-', '_')}.slice/cri-containerd-{container}.scope"
        )

    def _active(self, node: str, second: int) -> list[tuple[Run, Placement]]:
        active: list[tuple[Run, Placement]] = []
        for job in self._jobs[node]:
            run = run_at(job, self.origin, second)
            if run is not None:
                active.extend((run, p) for p in job.placements)
        return active

    def hardware(self, node: str, t: float) -> NodeHardware:
        """What NVML reports on `node` when read at `t`: the state of the second before it."""
        gpus = self.gpus(node)
        second = math.ceil(t) - 1
        active = self._active(node, second)
        seed_key = mix_key(self.file.scenario.seed, "gpu", node)
        states: list[GpuState] = []
        for gpu in gpus:
            here = [(run, p) for run, p in active if p.gpu == gpu.index]
            gpu_key = seed_key ^ (gpu.index + 1) * 0x51ED
            if gpu.mig_enabled:
                migs: list[MigState] = []
                busy_slices = 0.0
                for inst in gpu.mig:
                    procs = tuple(
                        self._process_state(r, p, second) for r, p in here if p.mig == inst.index
                    )
                    busy_slices += inst.slices * min(1.0, sum(p.sm_util for p in procs))
                    migs.append(
                        MigState(
                            instance=inst,
                            used_memory_bytes=min(
                                inst.memory_total_bytes, sum(p.used_memory_bytes for p in procs)
                            ),
                            processes=procs,
                            activity=Activity.of(procs),
                        )
                    )
                slices = max(1, gpu.max_mig_devices)
                util = busy_slices / slices
                processes: tuple[ProcessState, ...] = tuple(p for m in migs for p in m.processes)
                mig_states = tuple(migs)
                weights = [(m.instance.slices / slices, m.activity) for m in migs]
                activity = Activity.weighted(weights)
            else:
                processes = tuple(self._process_state(r, p, second) for r, p in here)
                util = min(1.0, sum(p.sm_util for p in processes))
                mig_states = ()
                activity = Activity.of(processes)
            util_mem = min(1.0, sum(p.mem_util for p in processes))
            noise = uniform(gpu_key, second) - 0.5
            idle_w = 0.1 * gpu.power_limit_w
            power = idle_w + (0.92 * gpu.power_limit_w - idle_w) * util
            states.append(
                GpuState(
                    gpu=gpu,
                    util_gpu=util,
                    util_mem=util_mem,
                    used_memory_bytes=min(
                        gpu.memory_total_bytes, sum(p.used_memory_bytes for p in processes)
                    ),
                    power_w=max(0.0, power * (1.0 + 0.04 * noise)),
                    temp_c=round(31 + 45 * util + 2 * noise),
                    processes=processes,
                    mig=mig_states,
                    activity=activity,
                )
            )
        return NodeHardware(
            node=node, t=t, driver_version=self.file.scenario.driver_version, gpus=tuple(states)
        )

    def activity_between(
        self, node: str, t1: float, t2: float
    ) -> dict[tuple[int, int | None], Activity]:
        """Each device's GPM activity integrated over (t1, t2] (fraction x seconds), keyed
        by (GPU index, MIG index or None). Second k's state holds over (k - 1, k]; a span
        longer than GPM_SPAN_S counts its first part at the rate of the part after it."""
        parts: dict[tuple[int, int | None], list[tuple[float, Activity]]] = {}
        if t2 <= t1:
            return {}
        start = max(t1, t2 - GPM_SPAN_S)
        pieces: list[tuple[float, float]] = []  # (second's end, seconds of it in the span)
        s = start
        while s < t2:
            end = min(t2, math.floor(s) + 1.0)
            pieces.append((math.ceil(end), end - s))
            s = end
        if start > t1:  # the cut-off part, at its next second's rate
            second, weight = pieces[0]
            pieces[0] = (second, weight + start - t1)
        for second, weight in pieces:
            for state in self.hardware(node, second).gpus:
                parts.setdefault((state.gpu.index, None), []).append((weight, state.activity))
                for m in state.mig:
                    parts.setdefault((state.gpu.index, m.instance.index), []).append(
                        (weight, m.activity)
                    )
        return {key: Activity.weighted(timed, math.inf) for key, timed in parts.items()}

    def process_utilization(
        self, node: str, gpu_index: int, after: float, until: float
    ) -> list[ProcessUtilSample]:
        """Per-process samples with `after < time <= until`, as NVML's driver buffer holds them.

        Only processes with non-zero utilization get a sample (NVML documents the same).
        MIG-enabled GPUs have none: NVML does not support per-process utilization there.
        """
        gpu = self.gpus(node)[gpu_index]
        if gpu.mig_enabled:
            return []
        after = max(after, until - PROCESS_SAMPLE_BUFFER_S)
        period, phase = PROCESS_SAMPLE_PERIOD_S, PROCESS_SAMPLE_PHASE_S
        k = math.floor((after - phase) / period) + 1
        samples: list[ProcessUtilSample] = []
        while (tau := k * period + phase) <= until:
            if tau > after:
                second = math.floor(tau)
                for run, p in self._active(node, second):
                    if p.gpu != gpu_index:
                        continue
                    util = job_util(run, p.position, second) * p.share
                    jitter = uniform(run.job.key ^ 0x5A5, k) - 0.5
                    sm = round(100 * clamp(util + 0.04 * jitter * (util > 0)))
                    if sm > 0:
                        samples.append(
                            ProcessUtilSample(
                                pid=self._pid(run, p),
                                ts_us=round(tau * 1_000_000),
                                sm_util=sm,
                                mem_util=round(sm * 0.6),
                            )
                        )
            k += 1
        return samples

    # -- metadata events

    def events_between(
        self, t0: float, t1: float, nodes: Collection[str] | None = None
    ) -> list[tuple[str, str, BaseModel]]:
        """(topic short name, key, message) of every event with `t0 <= ts < t1`, in time order.

        `nodes` limits them to those nodes' descriptions and the jobs placed on them.
        """
        header = self.file.scenario
        wanted = set(self.node_names if nodes is None else nodes)
        out: list[tuple[float, int, str, str, BaseModel]] = []
        order = 0

        def add(ts: float, topic: str, key: str, message: BaseModel) -> None:
            nonlocal order
            if t0 <= ts < t1:
                out.append((ts, order, topic, key, message))
            order += 1

        # Node descriptions: at the origin, then again now and then for late consumers.
        every = header.node_info_every_s
        if every > 0:
            first = max(0, math.ceil((t0 - self.origin) / every))
            last = math.floor((t1 - self.origin) / every)
            ticks = [self.origin + k * every for k in range(first, last + 1)]
        else:
            ticks = [self.origin]
        for ts in ticks:
            for node in self.file.nodes:
                if node.name in wanted:
                    add(ts, "nodes", node.name, self._node_info(node, ts))
        for node_name, node_jobs in self._jobs.items():
            if node_name not in wanted:
                continue
            for job in node_jobs:
                for run in runs_between(job, self.origin, t0, t1):
                    job_id = self._job_id(job, run.cycle)
                    if job.sends_job_events:
                        add(run.start, "jobs", job_id, self._job_event(run, finished=False))
                        if run.end is not None:
                            add(run.end, "jobs", job_id, self._job_event(run, finished=True))
                    if job.spec.requests_per_s > 0:
                        for ts, message in self._usage_events(run, t0, t1):
                            add(ts, "usage", message.job_id, message)
        out.sort(key=lambda item: (item[0], item[1]))
        return [(topic, key, message) for _, _, topic, key, message in out]

    def _node_info(self, node: NodeSpec, ts: float) -> NodeInfo:
        return NodeInfo(
            ts=ts,
            node=node.name,
            provider=node.provider,
            region=node.region,
            instance_type=node.instance_type,
            pricing_model=node.pricing_model,
            usd_per_gpu_hour=node.usd_per_gpu_hour,
        )

    def _job_gpu_uuids(self, job: Job) -> list[str]:
        gpus = self.gpus(job.spec.node)
        if job.spec.mig_instance is not None:
            return [gpus[job.spec.gpus[0]].mig[job.spec.mig_instance].uuid]
        return [gpus[i].uuid for i in job.spec.gpus]

    def _job_event(self, run: Run, finished: bool) -> JobEvent:
        spec = run.job.spec
        explicit = spec.announce == "explicit"
        return JobEvent(
            ts=run.end if finished and run.end is not None else run.start,
            job_id=self._job_id(run.job, run.cycle),
            state=spec.final_state if finished else JobState.running,
            team=spec.team,
            project=spec.project,
            job_type=spec.job_type,
            experiment_id=self._template(spec.experiment_id, run.cycle),
            model=spec.model,
            environment=spec.environment,
            gpu_uuids=self._job_gpu_uuids(run.job) if explicit else None,
            started_at=run.start,
            ended_at=run.end if finished else None,
            labels={"node": spec.node, **(spec.labels or {})},
        )

    def _usage_events(self, run: Run, t0: float, t1: float) -> list[tuple[float, UsageEvent]]:
        every = self.file.scenario.usage_every_s
        job_id = self._job_id(run.job, run.cycle)
        first = max(1, math.ceil((t0 - run.start) / every))
        events: list[tuple[float, UsageEvent]] = []
        j = first
        while True:
            ts = run.start + j * every
            if run.end is not None and ts >= run.end:
                ts = run.end  # the last, partial period closes with the job
            if ts >= t1:
                break
            if ts >= t0:
                since = run.start + (j - 1) * every
                events.append((ts, self._usage(run, job_id, since, ts)))
            if run.end is not None and ts == run.end:
                break
            j += 1
        return events

    def _usage(self, run: Run, job_id: str, since: float, until: float) -> UsageEvent:
        spec = run.job.spec
        requests = 0
        tokens = 0
        for second in range(math.ceil(since), math.ceil(until)):
            util = job_util(run, 0, second)
            n = uniform(run.job.key ^ 0x0E0, second)
            r = round(spec.requests_per_s * util * (0.8 + 0.4 * n))
            requests += r
            spread = 0.7 + 0.6 * uniform(run.job.key ^ 0x70C, second)
            tokens += round(r * spec.tokens_per_request * spread)
        return UsageEvent(ts=until, job_id=job_id, requests=requests, tokens=tokens)
