"""The fleet scenario engine: a simulated fleet as a pure function of scenario time.

A scenario file (TOML, format in `agents/scenarios/README.md`) names nodes, their GPUs (MIG
partitions included) and the jobs that run on them. `Scenario.hardware(node, t)` answers what
NVML would report at time `t`, and `Scenario.events_between(t0, t1)` the job, node and usage
messages a scheduler and an inference gateway would publish. Both depend only on the file,
the seed, the origin and `t`: the same inputs always give the same values, which tests and
replays rely on.

The answers are plain dataclasses, independent of any NVML binding, so that the Python NVML
shim (`agents/simnvml.py`) and a C-ABI `libnvidia-ml.so.1` can serve the same fleet.
"""

from __future__ import annotations

import hashlib
import math
import tomllib
import uuid
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from gpuledger.schema.messages import (
    JobEvent,
    JobState,
    JobType,
    NodeInfo,
    PricingModel,
    UsageEvent,
)

MIB = 1024 * 1024
# Per-process utilization samples land this often (NVML keeps a ring of recent samples);
# the phase keeps them off whole seconds so no sample sits exactly on a read boundary.
PROCESS_SAMPLE_PERIOD_S = 0.5
PROCESS_SAMPLE_PHASE_S = 0.123
# How far back the simulated driver's sample buffer reaches (a read with lastSeen = 0).
PROCESS_SAMPLE_BUFFER_S = 20.0
HOST_CGROUP = "0::/user.slice/user-1000.slice/session-2.scope"

Profile = Literal["busy", "bursty", "idle", "shared", "notebook"]
Announce = Literal["explicit", "labels"]
Runtime = Literal["host", "docker", "kubernetes"]


class ScenarioError(ValueError):
    """A scenario file that cannot be used; the message names the file, the field and the fix."""


@dataclass(frozen=True)
class Product:
    """What a GPU model reports when the scenario file does not say otherwise."""

    memory_mib: int
    power_limit_w: float
    mig_slices: int  # 0 = no MIG


PRODUCTS: dict[str, Product] = {
    "NVIDIA B200": Product(183359, 1000.0, 7),
    "NVIDIA H200": Product(143771, 700.0, 7),
    "NVIDIA H100 80GB HBM3": Product(81559, 700.0, 7),
    "NVIDIA H100 PCIe": Product(81559, 350.0, 7),
    "NVIDIA A100-SXM4-80GB": Product(81920, 400.0, 7),
    "NVIDIA A100 80GB PCIe": Product(81920, 300.0, 7),
    "NVIDIA A100-SXM4-40GB": Product(40960, 400.0, 7),
    "NVIDIA A30": Product(24576, 165.0, 4),
    "NVIDIA L40S": Product(46068, 350.0, 0),
    "NVIDIA L4": Product(23034, 72.0, 0),
    "NVIDIA A10G": Product(23028, 300.0, 0),
    "Tesla T4": Product(15360, 70.0, 0),
    "Tesla V100-SXM2-16GB": Product(16384, 300.0, 0),
}

_PROFILE_LEVEL: dict[str, float] = {
    "busy": 0.93,
    "bursty": 0.5,
    "idle": 0.0,
    "shared": 0.35,
    "notebook": 0.03,
}


# --- the file format (validated) ---------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ProcessSpec(_Strict):
    name: str = "python"
    pid: Annotated[int, Field(gt=0, lt=4_194_304)] | None = None
    gpus: list[int] | None = None
    kind: Literal["compute", "graphics"] = "compute"


class GpuGroupSpec(_Strict):
    name: str
    count: Annotated[int, Field(ge=1, le=64)] = 1
    memory_mib: Annotated[int, Field(gt=0)] | None = None
    power_limit_w: Annotated[float, Field(gt=0)] | None = None
    mig: list[str] | None = None


class NodeSpec(_Strict):
    name: str
    provider: str = "*"
    region: str = "*"
    instance_type: str = ""
    pricing_model: PricingModel = PricingModel.on_demand
    usd_per_gpu_hour: Annotated[float, Field(ge=0)] | None = None
    gpus: list[GpuGroupSpec]


class JobSpec(_Strict):
    job_id: str
    team: str | None = None
    project: str | None = None
    job_type: JobType = JobType.other
    experiment_id: str | None = None
    labels: dict[str, str] | None = None
    node: str
    gpus: list[int]
    mig_instance: Annotated[int, Field(ge=0)] | None = None
    start_s: Annotated[float, Field(ge=0)] = 0.0
    end_s: Annotated[float, Field(gt=0)] | None = None
    repeat_every_s: Annotated[float, Field(gt=0)] | None = None
    final_state: JobState = JobState.succeeded
    announce: Announce = "explicit"
    job_events: bool | None = None
    profile: Profile = "busy"
    util: Annotated[float, Field(ge=0, le=1)] | None = None
    mem_gb: Annotated[float, Field(ge=0)] = 8.0
    processes: list[ProcessSpec] | None = None
    runtime: Runtime = "host"
    env: dict[str, str] | None = None
    label_env: bool = True
    requests_per_s: Annotated[float, Field(ge=0)] = 0.0
    tokens_per_request: Annotated[float, Field(ge=0)] = 0.0

    @model_validator(mode="after")
    def _check(self) -> JobSpec:
        if not self.gpus:
            raise ValueError("gpus must list at least one GPU index, e.g. gpus = [0]")
        if self.end_s is not None and self.end_s <= self.start_s:
            raise ValueError(f"end_s must be after start_s ({self.start_s}), got {self.end_s}")
        if self.repeat_every_s is not None:
            if self.end_s is None:
                raise ValueError("a job with repeat_every_s needs end_s")
            if self.end_s - self.start_s > self.repeat_every_s:
                raise ValueError(
                    f"a cycle ({self.end_s - self.start_s} s) must fit in repeat_every_s "
                    f"({self.repeat_every_s} s)"
                )
        if self.mig_instance is not None and len(self.gpus) != 1:
            raise ValueError("mig_instance needs exactly one GPU in gpus")
        if self.final_state in (JobState.running, JobState.pending):
            raise ValueError(f"final_state must be a finished state, got {self.final_state}")
        return self


class ScenarioHeader(_Strict):
    name: str = "scenario"
    seed: int = 0
    driver_version: str = "550.54.15"
    origin: float | None = None
    node_info_every_s: Annotated[float, Field(ge=0)] = 3600.0
    usage_every_s: Annotated[float, Field(gt=0)] = 10.0


class ScenarioFile(_Strict):
    scenario: ScenarioHeader = ScenarioHeader()
    nodes: list[NodeSpec]
    jobs: list[JobSpec] = []


# --- what the engine answers ---------------------------------------------------------------


@dataclass(frozen=True)
class MigInstance:
    index: int  # the MIG device index under its parent (nvmlDeviceGetMigDeviceHandleByIndex)
    profile: str  # "3g.40gb"
    uuid: str
    slices: int
    memory_total_bytes: int


@dataclass(frozen=True)
class Gpu:
    node: str
    index: int
    name: str
    uuid: str
    memory_total_bytes: int
    power_limit_w: float
    max_mig_devices: int  # 0 when the model has no MIG
    mig_enabled: bool  # MIG mode on (possibly with no instance created yet)
    mig: tuple[MigInstance, ...]


@dataclass(frozen=True)
class ProcessState:
    pid: int
    name: str
    kind: Literal["compute", "graphics"]
    job_id: str
    used_memory_bytes: int
    sm_util: float  # 0..1 over the last second
    mem_util: float
    env: Mapping[str, str]
    cgroup: str


@dataclass(frozen=True)
class MigState:
    instance: MigInstance
    used_memory_bytes: int
    processes: tuple[ProcessState, ...]


@dataclass(frozen=True)
class GpuState:
    gpu: Gpu
    util_gpu: float  # 0..1 over the last second
    util_mem: float
    used_memory_bytes: int
    power_w: float
    temp_c: int
    processes: tuple[ProcessState, ...]
    mig: tuple[MigState, ...]


@dataclass(frozen=True)
class NodeHardware:
    node: str
    t: float
    driver_version: str
    gpus: tuple[GpuState, ...]


@dataclass(frozen=True)
class ProcessUtilSample:
    pid: int
    ts_us: int  # CPU time of the sample, epoch microseconds (NVML's timeStamp)
    sm_util: int  # percent, as NVML gives it
    mem_util: int


# --- deterministic noise ---------------------------------------------------------------

_MASK = (1 << 64) - 1


def _splitmix(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


def _key(*parts: object) -> int:
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def _unit(key: int, n: int) -> float:
    """A uniform number in [0, 1) fixed by (key, n)."""
    return _splitmix(key ^ _splitmix(n & _MASK)) / 18446744073709551616.0


def _clamp(x: float, lo: float = 0.0, hi: float = 1.0) -> float:
    return lo if x < lo else hi if x > hi else x


def gpu_uuid(node: str, index: int) -> str:
    """NVML-format UUID for GPU `index` of `node`, stable across scenarios and runs."""
    return "GPU-" + str(uuid.UUID(bytes=hashlib.blake2b(f"{node}/{index}".encode()).digest()[:16]))


def mig_uuid(node: str, index: int, mig_index: int) -> str:
    digest = hashlib.blake2b(f"{node}/{index}/mig{mig_index}".encode()).digest()[:16]
    return "MIG-" + str(uuid.UUID(bytes=digest))


def parse_mig_profile(profile: str) -> tuple[int, int]:
    """(slices, memory GB) of a GPU instance profile like "3g.40gb" or "1g.10gb+me"."""
    body = profile.split("+", 1)[0]
    try:
        g, mem = body.split(".", 1)
        if not (g.endswith("g") and mem.endswith("gb")):
            raise ValueError
        return int(g[:-1]), int(mem[:-2])
    except ValueError:
        raise ScenarioError(
            f"MIG profile must look like '3g.40gb' (slices 'g', memory 'gb'), got {profile!r}"
        ) from None


# --- jobs compiled for fast evaluation ------------------------------------------------------


@dataclass(frozen=True)
class _Placement:
    """One process of a job on one GPU (or MIG instance)."""

    gpu: int
    mig: int | None
    position: int  # the GPU's position in the job's gpu list (correlated noise)
    process_index: int
    name: str
    pid: int | None
    kind: Literal["compute", "graphics"]
    share: float  # the job's per-GPU utilization divided among its processes on that GPU


@dataclass(frozen=True)
class _Job:
    spec: JobSpec
    number: int  # position in the file, part of noise keys
    key: int
    placements: tuple[_Placement, ...]
    level: float

    @property
    def period(self) -> float | None:
        return self.spec.repeat_every_s

    @property
    def sends_job_events(self) -> bool:
        if self.spec.job_events is not None:
            return self.spec.job_events
        return self.spec.announce == "explicit"


@dataclass(frozen=True)
class _Run:
    """One cycle of a job: [start, end) in epoch seconds (end None = open)."""

    job: _Job
    cycle: int
    start: float
    end: float | None

    def contains(self, s: float) -> bool:
        return self.start <= s and (self.end is None or s < self.end)


@dataclass
class Scenario:
    """A loaded scenario anchored at `origin` (epoch seconds where job offsets count from)."""

    file: ScenarioFile
    origin: float
    source: str = "<scenario>"
    _gpus: dict[str, tuple[Gpu, ...]] = field(default_factory=dict, repr=False)
    _jobs: dict[str, tuple[_Job, ...]] = field(default_factory=dict, repr=False)

    # -- loading

    @classmethod
    def load(cls, path: str | Path, origin: float | None = None) -> Scenario:
        """Read a TOML scenario; `origin` overrides the file's `[scenario] origin`."""
        path = Path(path)
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ScenarioError(f"cannot read scenario file {path}: {exc.strerror}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ScenarioError(f"{path}: not valid TOML: {exc}") from exc
        return cls.from_dict(data, origin=origin, source=str(path))

    @classmethod
    def from_dict(
        cls, data: Mapping[str, Any], origin: float | None = None, source: str = "<scenario>"
    ) -> Scenario:
        try:
            spec = ScenarioFile.model_validate(data)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}"
                + (f" (got {err['input']!r})" if err["type"] != "missing" else "")
                for err in exc.errors()
            )
            raise ScenarioError(f"{source}: {problems}") from None
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
            self._gpus[node.name] = self._compile_gpus(node)
        jobs: dict[str, list[_Job]] = {n: [] for n in names}
        for number, spec in enumerate(self.file.jobs):
            where = f"{self.source}: jobs[{number}] ({spec.job_id})"
            if spec.node not in self._gpus:
                raise ScenarioError(f"{where}: node {spec.node!r} is not one of {names}")
            self._check_templates(where, spec)
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
            jobs[spec.node].append(self._compile_job(number, spec, seed))
        self._jobs = {n: tuple(js) for n, js in jobs.items()}

    def _compile_gpus(self, node: NodeSpec) -> tuple[Gpu, ...]:
        gpus: list[Gpu] = []
        for group_number, group in enumerate(node.gpus):
            where = f"{self.source}: node {node.name} gpus[{group_number}]"
            product = PRODUCTS.get(group.name)
            memory_mib = group.memory_mib or (product.memory_mib if product else None)
            power = group.power_limit_w or (product.power_limit_w if product else None)
            if memory_mib is None or power is None:
                raise ScenarioError(
                    f"{where}: unknown GPU product {group.name!r}; set memory_mib and "
                    f"power_limit_w, or use one of {sorted(PRODUCTS)}"
                )
            max_slices = product.mig_slices if product else 7
            for _ in range(group.count):
                index = len(gpus)
                instances: list[MigInstance] = []
                if group.mig is not None:
                    if max_slices == 0:
                        raise ScenarioError(f"{where}: {group.name} does not support MIG")
                    used = 0
                    for mig_index, profile in enumerate(group.mig):
                        slices, mem_gb = parse_mig_profile(profile)
                        used += slices
                        instances.append(
                            MigInstance(
                                index=mig_index,
                                profile=profile,
                                uuid=mig_uuid(node.name, index, mig_index),
                                slices=slices,
                                # NVML reports a little less than the profile's nominal size
                                memory_total_bytes=(mem_gb * 1024 - 512) * MIB,
                            )
                        )
                    if used > max_slices:
                        raise ScenarioError(
                            f"{where}: MIG profiles {group.mig} use {used} slices; "
                            f"{group.name} has {max_slices}"
                        )
                gpus.append(
                    Gpu(
                        node=node.name,
                        index=index,
                        name=group.name,
                        uuid=gpu_uuid(node.name, index),
                        memory_total_bytes=memory_mib * MIB,
                        power_limit_w=float(power),
                        max_mig_devices=max_slices,
                        mig_enabled=group.mig is not None,
                        mig=tuple(instances),
                    )
                )
        return tuple(gpus)

    def _check_templates(self, where: str, spec: JobSpec) -> None:
        values = {"cycle": 0, "run": "0"}
        fields = {"job_id": spec.job_id, "experiment_id": spec.experiment_id or ""}
        fields.update({f"env.{k}": v for k, v in (spec.env or {}).items()})
        for name, template in fields.items():
            try:
                template.format_map(values)
            except (KeyError, ValueError, IndexError) as exc:
                raise ScenarioError(
                    f"{where}: {name} {template!r} may use only {{cycle}} and {{run}}: {exc}"
                ) from None

    def _compile_job(self, number: int, spec: JobSpec, seed: int) -> _Job:
        placements: list[_Placement] = []
        procs = spec.processes or [ProcessSpec(gpus=[g]) for g in spec.gpus]
        for process_index, proc in enumerate(procs):
            for gpu in proc.gpus if proc.gpus is not None else spec.gpus:
                if gpu not in spec.gpus:
                    raise ScenarioError(
                        f"{self.source}: jobs[{number}] ({spec.job_id}): process {proc.name} "
                        f"uses GPU {gpu}, which is not in the job's gpus {spec.gpus}"
                    )
                placements.append(
                    _Placement(
                        gpu=gpu,
                        mig=spec.mig_instance,
                        position=spec.gpus.index(gpu),
                        process_index=process_index,
                        name=proc.name,
                        pid=proc.pid,
                        kind=proc.kind,
                        share=1.0,
                    )
                )
        # A job's utilization on a GPU is divided among its processes there.
        per_gpu: dict[int, int] = {}
        for p in placements:
            per_gpu[p.gpu] = per_gpu.get(p.gpu, 0) + 1
        placements = [
            _Placement(**{**p.__dict__, "share": 1.0 / per_gpu[p.gpu]}) for p in placements
        ]
        level = spec.util if spec.util is not None else _PROFILE_LEVEL[spec.profile]
        return _Job(
            spec=spec,
            number=number,
            key=_key(seed, "job", number, spec.job_id),
            placements=tuple(placements),
            level=level,
        )

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

    def _runs_between(self, job: _Job, t0: float, t1: float) -> list[_Run]:
        """Cycles of `job` that overlap [t0, t1]."""
        spec = job.spec
        first = self.origin + spec.start_s
        length = None if spec.end_s is None else spec.end_s - spec.start_s
        period = job.period
        if period is None:
            end = None if length is None else first + length
            run = _Run(job, 0, first, end)
            if first <= t1 and (end is None or end >= t0):
                return [run]
            return []
        assert length is not None  # validated: a repeating job has an end
        lo = max(0, math.floor((t0 - first - length) / period))
        hi = math.floor((t1 - first) / period)
        return [
            _Run(job, k, first + k * period, first + k * period + length)
            for k in range(lo, hi + 1)
            if first + k * period + length >= t0
        ]

    def _run_at(self, job: _Job, s: float) -> _Run | None:
        for run in self._runs_between(job, s, s):
            if run.contains(s):
                return run
        return None

    def _job_id(self, job: _Job, cycle: int) -> str:
        return job.spec.job_id.format_map({"cycle": cycle, "run": self.run_tag})

    def _template(self, text: str | None, cycle: int) -> str | None:
        if text is None:
            return None
        return text.format_map({"cycle": cycle, "run": self.run_tag})

    # -- utilization model

    def _job_util(self, run: _Run, position: int, second: int) -> float:
        """The job's utilization on its GPU at `position` during `second`."""
        job = run.job
        profile = job.spec.profile
        level = job.level
        shared = _unit(job.key, second)
        own = _unit(job.key ^ (position + 1) * 0x9E37, second)
        noise = 0.7 * shared + 0.3 * own - 0.5  # GPUs of one job move together
        rel = second - run.start
        if profile == "busy":
            if rel < 20:  # data loading and compilation before the first step
                return _clamp(0.12 + 0.1 * noise)
            if rel % 600 >= 585:  # checkpoint every 10 minutes
                return _clamp(0.08 + 0.1 * noise)
            return _clamp(level + 0.1 * noise)
        if profile == "bursty":
            wave = 0.3 * math.sin(2 * math.pi * second / 240.0)
            burst = 0.35 if _unit(job.key ^ 0xB0, second // 5) > 0.9 else 0.0
            return _clamp(level + wave + 0.3 * noise + burst, 0.02, 1.0)
        if profile == "idle":
            return 0.02 if _unit(job.key ^ 0x1D, second) > 0.97 else 0.0
        if profile == "shared":
            return _clamp(level + 0.3 * noise)
        # notebook: mostly a kernel waiting for its user, now and then a cell that computes
        if _unit(job.key ^ 0x7B, second // 60) > 0.75:
            return _clamp(0.55 + 0.4 * noise)
        return _clamp(level + 0.06 * noise)

    def _process_state(self, run: _Run, p: _Placement, second: int) -> ProcessState:
        job = run.job
        spec = job.spec
        util = self._job_util(run, p.position, second) * p.share
        mem_noise = _unit(job.key ^ 0x3E3, second)
        job_id = self._job_id(job, run.cycle)
        return ProcessState(
            pid=self._pid(run, p),
            name=p.name,
            kind=p.kind,
            job_id=job_id,
            used_memory_bytes=int(spec.mem_gb * p.share * 1024 * MIB),
            sm_util=util,
            mem_util=_clamp(util * (0.55 + 0.1 * mem_noise)),
            env=self._environ(run, job_id),
            cgroup=self._cgroup(run, p),
        )

    def _pid(self, run: _Run, p: _Placement) -> int:
        if p.pid is not None:
            return p.pid
        base = 2000 + _key(self.file.scenario.seed, "pid", run.job.number) % 900_000
        return base + (run.cycle % 1000) * 64 + p.process_index

    def _environ(self, run: _Run, job_id: str) -> dict[str, str]:
        spec = run.job.spec
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/home/ml"}
        if spec.label_env:
            env["GPULEDGER_JOB_ID"] = job_id
            for var, value in (
                ("GPULEDGER_TEAM", spec.team),
                ("GPULEDGER_PROJECT", spec.project),
                ("GPULEDGER_JOB_TYPE", spec.job_type.value),
                ("GPULEDGER_EXPERIMENT_ID", self._template(spec.experiment_id, run.cycle)),
            ):
                if value:
                    env[var] = value
        for var, template in (spec.env or {}).items():
            env[var] = template.format_map({"cycle": run.cycle, "run": self.run_tag})
        return env

    def _cgroup(self, run: _Run, p: _Placement) -> str:
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

    def _active(self, node: str, second: int) -> list[tuple[_Run, _Placement]]:
        active: list[tuple[_Run, _Placement]] = []
        for job in self._jobs[node]:
            run = self._run_at(job, second)
            if run is not None:
                active.extend((run, p) for p in job.placements)
        return active

    def hardware(self, node: str, t: float) -> NodeHardware:
        """What NVML reports on `node` when read at `t`: the state of the second before it."""
        gpus = self.gpus(node)
        second = math.ceil(t) - 1
        active = self._active(node, second)
        seed_key = _key(self.file.scenario.seed, "gpu", node)
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
                        )
                    )
                util = busy_slices / max(1, gpu.max_mig_devices)
                processes: tuple[ProcessState, ...] = tuple(p for m in migs for p in m.processes)
                mig_states = tuple(migs)
            else:
                processes = tuple(self._process_state(r, p, second) for r, p in here)
                util = min(1.0, sum(p.sm_util for p in processes))
                mig_states = ()
            util_mem = min(1.0, sum(p.mem_util for p in processes))
            noise = _unit(gpu_key, second) - 0.5
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
                )
            )
        return NodeHardware(
            node=node, t=t, driver_version=self.file.scenario.driver_version, gpus=tuple(states)
        )

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
                    util = self._job_util(run, p.position, second) * p.share
                    jitter = _unit(run.job.key ^ 0x5A5, k) - 0.5
                    sm = round(100 * _clamp(util + 0.04 * jitter * (util > 0)))
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
                for run in self._runs_between(job, t0, t1):
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

    def _job_gpu_uuids(self, job: _Job) -> list[str]:
        gpus = self.gpus(job.spec.node)
        if job.spec.mig_instance is not None:
            return [gpus[job.spec.gpus[0]].mig[job.spec.mig_instance].uuid]
        return [gpus[i].uuid for i in job.spec.gpus]

    def _job_event(self, run: _Run, finished: bool) -> JobEvent:
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
            gpu_uuids=self._job_gpu_uuids(run.job) if explicit else None,
            started_at=run.start,
            ended_at=run.end if finished else None,
            labels={"node": spec.node, **(spec.labels or {})},
        )

    def _usage_events(self, run: _Run, t0: float, t1: float) -> list[tuple[float, UsageEvent]]:
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

    def _usage(self, run: _Run, job_id: str, since: float, until: float) -> UsageEvent:
        spec = run.job.spec
        requests = 0
        tokens = 0
        for second in range(math.ceil(since), math.ceil(until)):
            util = self._job_util(run, 0, second)
            n = _unit(run.job.key ^ 0x0E0, second)
            r = round(spec.requests_per_s * util * (0.8 + 0.4 * n))
            requests += r
            spread = 0.7 + 0.6 * _unit(run.job.key ^ 0x70C, second)
            tokens += round(r * spec.tokens_per_request * spread)
        return UsageEvent(ts=until, job_id=job_id, requests=requests, tokens=tokens)
