"""The scenario file format: TOML validated into frozen models, and the GPU products it knows.

The format is described in `agents/scenarios/README.md`; `read_scenario_file` turns a file (or
a parsed dict) into a `ScenarioFile`, or a `ScenarioError` naming the file, the field and the fix.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from gpuledger.schema.messages import JobState, JobType, PricingModel

Profile = Literal["busy", "bursty", "idle", "shared", "notebook", "tiny_kernel"]
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
    gpm: bool = False  # NVML GPU Performance Monitoring: Hopper and later


PRODUCTS: dict[str, Product] = {
    "NVIDIA B200": Product(183359, 1000.0, 7, gpm=True),
    "NVIDIA H200": Product(143771, 700.0, 7, gpm=True),
    "NVIDIA H100 80GB HBM3": Product(81559, 700.0, 7, gpm=True),
    "NVIDIA H100 PCIe": Product(81559, 350.0, 7, gpm=True),
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

PROFILE_LEVEL: dict[str, float] = {
    "busy": 0.93,
    "bursty": 0.5,
    "idle": 0.0,
    "shared": 0.35,
    "notebook": 0.03,
    "tiny_kernel": 0.99,
}

# GPM's SM activity per unit of busy time: how many of the GPU's SMs a job's kernels keep busy
# while they run. A tiny kernel in a loop keeps the GPU "busy" all the time on a few SMs.
PROFILE_SM_FILL: dict[str, float] = {
    "busy": 0.85,
    "bursty": 0.7,
    "idle": 0.5,
    "shared": 0.6,
    "notebook": 0.6,
    "tiny_kernel": 0.03,
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
    gpm: bool | None = None  # None: as the product (Hopper and later have GPM)


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
    model: str | None = None
    environment: str | None = None
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
    sm_fill: Annotated[float, Field(ge=0, le=1)] | None = None
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


def read_toml(path: str | Path) -> dict[str, Any]:
    """The parsed TOML of a scenario file."""
    path = Path(path)
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ScenarioError(f"cannot read scenario file {path}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ScenarioError(f"{path}: not valid TOML: {exc}") from exc


def validate(data: Mapping[str, Any], source: str) -> ScenarioFile:
    """`data` as a `ScenarioFile`; every problem is named in one `ScenarioError`."""
    try:
        return ScenarioFile.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}"
            + (f" (got {err['input']!r})" if err["type"] != "missing" else "")
            for err in exc.errors()
        )
        raise ScenarioError(f"{source}: {problems}") from None
