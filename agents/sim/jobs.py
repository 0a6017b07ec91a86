"""Jobs compiled for fast evaluation: their placements, their cycles in time, and the
utilization model that says how busy a job keeps its GPUs each second.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from gpuledger.agents.sim.generator import clamp, mix_key, uniform
from gpuledger.agents.sim.spec import (
    PROFILE_LEVEL,
    PROFILE_SM_FILL,
    JobSpec,
    ProcessSpec,
    ScenarioError,
)
from gpuledger.schema.messages import JobType


@dataclass(frozen=True)
class Placement:
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
class Job:
    spec: JobSpec
    number: int  # position in the file, part of noise keys
    key: int
    placements: tuple[Placement, ...]
    level: float
    sm_fill: float  # SM activity per unit of busy time (GPM)
    tensor_share: float  # share of SM activity in tensor cores

    @property
    def period(self) -> float | None:
        return self.spec.repeat_every_s

    @property
    def sends_job_events(self) -> bool:
        if self.spec.job_events is not None:
            return self.spec.job_events
        return self.spec.announce == "explicit"


@dataclass(frozen=True)
class Run:
    """One cycle of a job: [start, end) in epoch seconds (end None = open)."""

    job: Job
    cycle: int
    start: float
    end: float | None

    def contains(self, s: float) -> bool:
        return self.start <= s and (self.end is None or s < self.end)


def check_templates(where: str, spec: JobSpec) -> None:
    """The job's templated fields use only `{cycle}` and `{run}`."""
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


def compile_job(number: int, spec: JobSpec, seed: int, source: str) -> Job:
    placements: list[Placement] = []
    procs = spec.processes or [ProcessSpec(gpus=[g]) for g in spec.gpus]
    for process_index, proc in enumerate(procs):
        for gpu in proc.gpus if proc.gpus is not None else spec.gpus:
            if gpu not in spec.gpus:
                raise ScenarioError(
                    f"{source}: jobs[{number}] ({spec.job_id}): process {proc.name} "
                    f"uses GPU {gpu}, which is not in the job's gpus {spec.gpus}"
                )
            placements.append(
                Placement(
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
    placements = [Placement(**{**p.__dict__, "share": 1.0 / per_gpu[p.gpu]}) for p in placements]
    level = spec.util if spec.util is not None else PROFILE_LEVEL[spec.profile]
    return Job(
        spec=spec,
        number=number,
        key=mix_key(seed, "job", number, spec.job_id),
        placements=tuple(placements),
        level=level,
        sm_fill=spec.sm_fill if spec.sm_fill is not None else PROFILE_SM_FILL[spec.profile],
        tensor_share=0.6 if spec.job_type in _TENSOR_HEAVY else 0.15,
    )


_TENSOR_HEAVY = frozenset({JobType.training, JobType.tuning, JobType.inference})


def runs_between(job: Job, origin: float, t0: float, t1: float) -> list[Run]:
    """Cycles of `job` (offsets counted from `origin`) that overlap [t0, t1]."""
    spec = job.spec
    first = origin + spec.start_s
    length = None if spec.end_s is None else spec.end_s - spec.start_s
    period = job.period
    if period is None:
        end = None if length is None else first + length
        run = Run(job, 0, first, end)
        if first <= t1 and (end is None or end >= t0):
            return [run]
        return []
    assert length is not None  # validated: a repeating job has an end
    lo = max(0, math.floor((t0 - first - length) / period))
    hi = math.floor((t1 - first) / period)
    return [
        Run(job, k, first + k * period, first + k * period + length)
        for k in range(lo, hi + 1)
        if first + k * period + length >= t0
    ]


def run_at(job: Job, origin: float, s: float) -> Run | None:
    for run in runs_between(job, origin, s, s):
        if run.contains(s):
            return run
    return None


def job_util(run: Run, position: int, second: int) -> float:
    """The job's utilization on its GPU at `position` during `second`."""
    job = run.job
    profile = job.spec.profile
    level = job.level
    shared = uniform(job.key, second)
    own = uniform(job.key ^ (position + 1) * 0x9E37, second)
    noise = 0.7 * shared + 0.3 * own - 0.5  # GPUs of one job move together
    rel = second - run.start
    if profile == "busy":
        if rel < 20:  # data loading and compilation before the first step
            return clamp(0.12 + 0.1 * noise)
        if rel % 600 >= 585:  # checkpoint every 10 minutes
            return clamp(0.08 + 0.1 * noise)
        return clamp(level + 0.1 * noise)
    if profile == "bursty":
        wave = 0.3 * math.sin(2 * math.pi * second / 240.0)
        burst = 0.35 if uniform(job.key ^ 0xB0, second // 5) > 0.9 else 0.0
        return clamp(level + wave + 0.3 * noise + burst, 0.02, 1.0)
    if profile == "idle":
        return 0.02 if uniform(job.key ^ 0x1D, second) > 0.97 else 0.0
    if profile == "shared":
        return clamp(level + 0.3 * noise)
    if profile == "tiny_kernel":  # one small kernel after another: never a gap
        return clamp(level + 0.01 * noise)
    # notebook: mostly a kernel waiting for its user, now and then a cell that computes
    if uniform(job.key ^ 0x7B, second // 60) > 0.75:
        return clamp(0.55 + 0.4 * noise)
    return clamp(level + 0.06 * noise)
