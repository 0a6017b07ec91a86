"""The simulated hardware: GPUs and MIG instances compiled from a node's spec, and the state
the engine answers for a moment (plain dataclasses, independent of any NVML binding, so that
the Python NVML (`agents/sim/nvml.py`) and the C-ABI library (`agents/sim/libnvml/`) serve the
same fleet).
"""

from __future__ import annotations

import dataclasses
import hashlib
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from gpuledger.agents.sim.spec import PRODUCTS, NodeSpec, ScenarioError

MIB = 1024 * 1024


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
    gpm: bool = False  # answers NVML's GPU Performance Monitoring calls


@dataclass(frozen=True)
class ProcessState:
    """A process on a device at one moment: its memory, its utilization over the last second,
    and what attribution reads of it (environment, cgroup)."""

    pid: int
    name: str
    kind: Literal["compute", "graphics"]
    job_id: str
    used_memory_bytes: int
    sm_util: float  # 0..1 over the last second
    mem_util: float
    env: Mapping[str, str]
    cgroup: str
    sm_active: float = 0.0  # share of its device's SMs it kept busy (GPM)
    tensor_share: float = 0.0  # share of that SM activity spent in tensor cores


@dataclass(frozen=True)
class Activity:
    """What GPM measures on a device (a GPU or a MIG instance) over the last second, 0..1."""

    sm_active: float = 0.0  # time an SM had at least one warp resident
    sm_occupancy: float = 0.0  # warps resident, of the most an SM holds
    tensor_active: float = 0.0  # cycles the tensor pipes were busy
    dram_active: float = 0.0  # cycles the memory interface was sending or receiving

    @classmethod
    def of(cls, processes: tuple[ProcessState, ...]) -> Activity:
        sm = min(1.0, sum((p.sm_active for p in processes), 0.0))
        tensor = min(sm, sum((p.sm_active * p.tensor_share for p in processes), 0.0))
        mem = min(1.0, sum((p.mem_util for p in processes), 0.0))
        return cls(sm_active=sm, sm_occupancy=0.55 * sm, tensor_active=tensor, dram_active=mem)

    @classmethod
    def weighted(cls, parts: list[tuple[float, Activity]], cap: float = 1.0) -> Activity:
        """Σ weight x activity, field by field, each at most `cap`: a GPU's activity from its
        MIG instances' (weights: their shares of the SMs), or activity over time (weights:
        seconds, no cap)."""
        return cls(
            *(
                min(cap, sum((w * getattr(a, f.name) for w, a in parts), 0.0))
                for f in dataclasses.fields(cls)
            )
        )


@dataclass(frozen=True)
class MigState:
    instance: MigInstance
    used_memory_bytes: int
    processes: tuple[ProcessState, ...]
    activity: Activity = Activity()


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
    activity: Activity = Activity()


@dataclass(frozen=True)
class NodeHardware:
    """One node's GPUs, with their MIG instances and processes, at scenario time `t`."""

    node: str
    t: float  # when NVML is read (scenario seconds): the state is the second before it
    driver_version: str  # what nvmlSystemGetDriverVersion answers, e.g. "550.54.15"
    gpus: tuple[GpuState, ...]


@dataclass(frozen=True)
class ProcessUtilSample:
    """One of NVML's per-process utilization samples (`nvmlProcessUtilizationSample_t`)."""

    pid: int
    ts_us: int  # CPU time of the sample, epoch microseconds (NVML's timeStamp)
    sm_util: int  # percent, as NVML gives it
    mem_util: int


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


def compile_gpus(node: NodeSpec, source: str) -> tuple[Gpu, ...]:
    """The GPUs of `node`, numbered in file order, with their MIG instances."""
    gpus: list[Gpu] = []
    for group_number, group in enumerate(node.gpus):
        where = f"{source}: node {node.name} gpus[{group_number}]"
        product = PRODUCTS.get(group.name)
        memory_mib = group.memory_mib or (product.memory_mib if product else None)
        power = group.power_limit_w or (product.power_limit_w if product else None)
        if memory_mib is None or power is None:
            raise ScenarioError(
                f"{where}: unknown GPU product {group.name!r}; set memory_mib and "
                f"power_limit_w, or use one of {sorted(PRODUCTS)}"
            )
        max_slices = product.mig_slices if product else 7
        gpm = group.gpm if group.gpm is not None else bool(product and product.gpm)
        if group.mig is not None and max_slices == 0:
            raise ScenarioError(f"{where}: {group.name} does not support MIG")
        for _ in range(group.count):
            index = len(gpus)
            instances = _mig_instances(
                where, node.name, index, group.name, group.mig or [], max_slices
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
                    mig=instances,
                    gpm=gpm,
                )
            )
    return tuple(gpus)


def _mig_instances(
    where: str, node: str, index: int, product: str, profiles: list[str], max_slices: int
) -> tuple[MigInstance, ...]:
    instances: list[MigInstance] = []
    used = 0
    for mig_index, profile in enumerate(profiles):
        slices, mem_gb = parse_mig_profile(profile)
        used += slices
        instances.append(
            MigInstance(
                index=mig_index,
                profile=profile,
                uuid=mig_uuid(node, index, mig_index),
                slices=slices,
                # NVML reports a little less than the profile's nominal size
                memory_total_bytes=(mem_gb * 1024 - 512) * MIB,
            )
        )
    if used > max_slices:
        raise ScenarioError(
            f"{where}: MIG profiles {profiles} use {used} slices; {product} has {max_slices}"
        )
    return tuple(instances)
