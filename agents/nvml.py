"""The NVML reader: every GPU and MIG instance of a node, with its processes, as `GpuSample`s.

It takes "an NVML module": the real `pynvml`, or `gpuledger.agents.sim.nvml.SimulatedNvml`,
which has the same functions. Every call goes through `nvml_query` (nvitop's `nvmlQuery` idea):
a field the hardware does not support, a function the driver lacks, a GPU that fell off the bus
or a process that exited gives `None` and a counter in `ReadStats`, never an exception, so a sample
still goes out with `None` where NVML had nothing.

Units leave here as ARCHITECTURE.md §2 says: fractions 0..1 (NVML gives percent), watts (NVML gives
milliwatts), bytes. A sample read at `now` stands for `[now - interval_s, now)`.
"""

from __future__ import annotations

import logging
import math
import os
import re
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import pynvml
from pydantic import ValidationError

from gpuledger.agents.attribution import UNKNOWN, Attributor, ProcAttributor, ProcessAttribution
from gpuledger.agents.gpm import GpmSampler
from gpuledger.agents.nvml_arrays import DIRECT_CALLS, read_util_sample
from gpuledger.schema.messages import UINT64_MAX, GpuSample, ProcessSample, assembler

log = logging.getLogger(__name__)

# pynvml itself, or a SimulatedNvml: anything with pynvml's function names.
NvmlModule = Any

_MIG_PROFILE = re.compile(r"\bMIG\s+(\S+)\s*$")


# ProcessSample's own validator, called with a dict: the same checks as `ProcessSample(...)`
# at a third of the cost, which counts at hundreds of processes a second.
_validate_process = ProcessSample.__pydantic_validator__.validate_python
_assemble_process = assembler(ProcessSample)


def _with_measures(known: ProcessSample, util: float | None, used: int) -> ProcessSample:
    """`known` with another utilization and memory, both already in range (the caller checks):
    what validation would give, without validating again the name and labels it kept."""
    values = known.__dict__.copy()
    values["util_sm"] = util
    values["mem_used_bytes"] = used
    return _assemble_process(values)


@dataclass(frozen=True, slots=True)
class _Device:
    """A device being read: its handle, and the parent GPU's (the same for a whole GPU)."""

    handle: Any
    parent: Any
    index: int
    uuid: str
    parent_uuid: str
    instance_id: int | None  # a MIG instance's GPU instance id


# A process's sample and what it was made of: (attribution, util_sm, mem_used_bytes, sample).
_KnownProcess = tuple[ProcessAttribution, float | None, int, ProcessSample]
_NONE_KNOWN: dict[int, _KnownProcess] = {}


@dataclass(frozen=True)
class DeviceInfo:
    """What the metrics need to label a sample the way dcgm-exporter does."""

    index: int  # the GPU's NVML index (the parent's, for a MIG instance)
    parent_uuid: str  # the GPU's own UUID for a GPU, the parent's for a MIG instance
    gpu_instance_id: int | None = None  # MIG only (nvmlDeviceGetGpuInstanceId)


@dataclass
class ReadStats:
    """What one `read` found, and what NVML could not tell."""

    gpus: int = 0
    mig_instances: int = 0
    processes: int = 0
    skipped_devices: int = 0  # no handle or no UUID: no sample possible
    repeated: bool = False  # `now` was not after the previous read: nothing new to report
    errors: Counter[str] = field(default_factory=Counter)  # by NVML error name
    errors_by_call: Counter[str] = field(default_factory=Counter)  # "function:error"

    def merge(self, other: ReadStats) -> None:
        self.gpus += other.gpus
        self.mig_instances += other.mig_instances
        self.processes += other.processes
        self.skipped_devices += other.skipped_devices
        self.errors.update(other.errors)
        self.errors_by_call.update(other.errors_by_call)


def error_name(exc: BaseException) -> str:
    """'NotSupported' for NVMLError_NotSupported, and so on."""
    if isinstance(exc, pynvml.NVMLLibraryMismatchError):
        return "FunctionNotFound"  # pynvml's unversioned wrappers turn it into this
    name = type(exc).__name__
    if isinstance(exc, pynvml.NVMLError) and name == "NVMLError":
        return f"NVMLError{getattr(exc, 'value', '')}"
    return name.removeprefix("NVMLError_")


def _percent(value: int | None) -> float | None:
    if value is None:
        return None
    return min(1.0, max(0.0, value / 100.0))


class NvmlReader:
    """Reads one node's GPUs through `nvml` (pynvml or a simulated one).

    `attribute` maps a PID to its container, pod and job labels: /proc by default; a
    simulation passes its own (simulated PIDs do not exist on this machine).
    """

    def __init__(
        self,
        nvml: NvmlModule,
        node_name: str,
        clock: Callable[[], float] = time.time,
        *,
        interval_s: float = 1.0,
        attribute: Attributor | None = None,
        max_gap_s: float | None = None,
    ) -> None:
        if interval_s <= 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s}")
        self.nvml = nvml
        self.node_name = node_name
        self.clock = clock
        self.interval_s = interval_s
        self.attribute: Attributor = attribute if attribute is not None else ProcAttributor()
        # A longer silence is a gap (agent stopped), not one long sample.
        self.max_gap_s = max_gap_s if max_gap_s is not None else 5 * interval_s
        self._last_now: float | None = None
        # NVML's lastSeenTimeStamp per GPU UUID, in microseconds.
        self._last_seen_us: dict[str, int] = {}
        self._stats = ReadStats()
        # Each process's sample of the previous read and what it was made of, by device UUID
        # and PID, and those of the read in progress: an unchanged process keeps its sample.
        self._processes: dict[str, dict[int, _KnownProcess]] = {}
        self._processes_now: dict[str, dict[int, _KnownProcess]] = {}
        # Every device seen, by UUID: labels for metrics (parent GPU, MIG instance id).
        self.devices: dict[str, DeviceInfo] = {}
        self.gpm = GpmSampler(self._call)
        # Process-list calls still to try: a driver older than R510 lacks the _v3 ones that
        # pynvml's unversioned wrappers call, and has the _v2 ones.
        self._process_calls: dict[str, list[str]] = {
            "compute": [
                "nvmlDeviceGetComputeRunningProcesses",
                "nvmlDeviceGetComputeRunningProcesses_v2",
            ],
            "graphics": [
                "nvmlDeviceGetGraphicsRunningProcesses",
                "nvmlDeviceGetGraphicsRunningProcesses_v2",
            ],
        }

    # -- lifecycle

    def init(self) -> None:
        """nvmlInit; raises pynvml's error (e.g. LibraryNotFound) for the caller to explain."""
        self.nvml.nvmlInit()

    def shutdown(self) -> None:
        self.gpm.close()
        self.nvml_query("nvmlShutdown")

    # -- the one way to call NVML

    def _call(
        self, func: str, *args: Any, expected: frozenset[str] = frozenset()
    ) -> tuple[Any, str | None]:
        """(result, None) or (None, error name), counting the error unless `expected`."""
        try:
            if self.nvml is pynvml and func in DIRECT_CALLS:
                function = DIRECT_CALLS[func]
            else:
                function = getattr(self.nvml, func)
        except AttributeError:
            # An older pynvml without this function is the same as a driver without it.
            error = "FunctionNotFound"
        else:
            try:
                return function(*args), None
            except (pynvml.NVMLError, pynvml.NVMLLibraryMismatchError) as exc:
                error = error_name(exc)
            except Exception as exc:  # a binding bug must not stop the samples
                error = type(exc).__name__
                if self._stats.errors_by_call[f"{func}:{error}"] == 0:
                    log.warning("NVML call %s failed unexpectedly: %r", func, exc)
        if error in expected:
            return None, error
        self._stats.errors[error] += 1
        self._stats.errors_by_call[f"{func}:{error}"] += 1
        return None, error

    def nvml_query(self, func: str, *args: Any, default: Any = None) -> Any:
        """Call NVML function `func`; `default` (and a counted error) instead of an exception."""
        value, error = self._call(func, *args)
        return default if error is not None else value

    # -- reading

    def _interval(self, now: float) -> float | None:
        previous = self._last_now
        if previous is not None:
            elapsed = round(now - previous, 6)
            if 0 < elapsed <= self.max_gap_s:
                # A late or skipped tick widens the sample, so that samples tile time.
                self._last_now = now
                return elapsed
            if elapsed <= 0 and -elapsed < self.max_gap_s:
                return None  # a repeated read covers nothing new
        self._last_now = now
        return self.interval_s

    def read(self, now: float | None = None) -> tuple[list[GpuSample], ReadStats]:
        """Samples of every GPU (or MIG instance) for the interval that ends at `now`."""
        if now is None:
            now = self.clock()
        self._stats = stats = ReadStats()
        interval = self._interval(now)
        if interval is None:
            stats.repeated = True
            return [], stats
        ts = now - interval
        samples: list[GpuSample] = []
        live_pids: set[int] = set()
        self._processes_now = {}
        count = self.nvml_query("nvmlDeviceGetCount", default=0)
        for index in range(count):
            handle = self.nvml_query("nvmlDeviceGetHandleByIndex", index)
            uuid = None if handle is None else self.nvml_query("nvmlDeviceGetUUID", handle)
            if handle is None or not uuid:
                stats.skipped_devices += 1
                continue
            name = self.nvml_query("nvmlDeviceGetName", handle, default="") or ""
            if uuid not in self.devices:
                self.devices[uuid] = DeviceInfo(index=index, parent_uuid=uuid)
            mig_mode = self.nvml_query("nvmlDeviceGetMigMode", handle)
            instances: list[GpuSample] = []
            if mig_mode is not None and mig_mode[0] == pynvml.NVML_DEVICE_MIG_ENABLE:
                instances = self._read_mig_instances(
                    handle, index, uuid, name, ts, interval, live_pids
                )
            if instances:
                # The instances are what jobs hold and what is billed; the parent would count
                # the same GPU twice.
                samples.extend(instances)
                stats.mig_instances += len(instances)
                continue
            device = _Device(handle, handle, index, uuid, uuid, None)
            sample = self._read_device(device, name, None, ts, interval, live_pids)
            if sample is not None:
                samples.append(sample)
                stats.gpus += 1
        self.gpm.forget(s.gpu_uuid for s in samples)
        self._processes = self._processes_now
        prune = getattr(self.attribute, "prune", None)
        if callable(prune):
            prune(live_pids)
        return samples, stats

    def _read_mig_instances(
        self,
        parent: Any,
        index: int,
        parent_uuid: str,
        parent_name: str,
        ts: float,
        interval: float,
        live: set[int],
    ) -> list[GpuSample]:
        samples: list[GpuSample] = []
        for mig_index in range(
            self.nvml_query("nvmlDeviceGetMaxMigDeviceCount", parent, default=0)
        ):
            # NOT_FOUND marks an empty slot, the normal case: not counted.
            handle, error = self._call(
                "nvmlDeviceGetMigDeviceHandleByIndex",
                parent,
                mig_index,
                expected=frozenset({"NotFound"}),
            )
            if error is not None:
                continue
            uuid = self.nvml_query("nvmlDeviceGetUUID", handle)
            if not uuid:
                self._stats.skipped_devices += 1
                continue
            if uuid not in self.devices:
                self.devices[uuid] = DeviceInfo(
                    index=index,
                    parent_uuid=parent_uuid,
                    gpu_instance_id=self.nvml_query("nvmlDeviceGetGpuInstanceId", handle),
                )
            instance_id = self.devices[uuid].gpu_instance_id
            profile = self._mig_profile(handle)
            device = _Device(handle, parent, index, uuid, parent_uuid, instance_id)
            sample = self._read_device(device, parent_name, profile, ts, interval, live)
            if sample is not None:
                samples.append(sample)
        return samples

    def _mig_profile(self, handle: Any) -> str | None:
        name = self.nvml_query("nvmlDeviceGetName", handle, default="") or ""
        match = _MIG_PROFILE.search(name)
        if match:
            return match.group(1)  # "1g.10gb"; "1c.3g.20gb" for a compute-instance slice
        attrs = self.nvml_query("nvmlDeviceGetAttributes", handle)
        if attrs is None:
            return None
        # NVML reports a little less memory than the profile's name says: round up.
        return f"{attrs.gpuInstanceSliceCount}g.{math.ceil(attrs.memorySizeMB / 1024)}gb"

    def _read_device(
        self,
        device: _Device,
        gpu_name: str,
        mig_profile: str | None,
        ts: float,
        interval: float,
        live: set[int],
    ) -> GpuSample | None:
        q = self.nvml_query
        handle, uuid = device.handle, device.uuid
        util = q("nvmlDeviceGetUtilizationRates", handle)
        memory = q("nvmlDeviceGetMemoryInfo", handle)
        power_mw = q("nvmlDeviceGetPowerUsage", handle)
        limit_mw = q("nvmlDeviceGetEnforcedPowerLimit", handle)
        if limit_mw is None:
            limit_mw = q("nvmlDeviceGetPowerManagementLimit", handle)
        temp = q("nvmlDeviceGetTemperature", handle, pynvml.NVML_TEMPERATURE_GPU)
        util_sm = None if util is None else _percent(util.gpu)
        gpm = self.gpm.read(
            device.parent, device.parent_uuid, uuid, device.instance_id, ts, ts + interval
        )
        if util_sm is None and device.instance_id is not None:
            # NVML has no busy time for a MIG instance: its SM activity stands for it.
            util_sm = gpm.get("sm_active")
        processes = self._read_processes(handle, uuid, ts, util_sm, live)
        try:
            return GpuSample(
                ts=ts,
                node=self.node_name,
                gpu_uuid=uuid,
                gpu_index=device.index,
                gpu_name=gpu_name[:256],
                mig_profile=mig_profile,
                interval_s=interval,
                util_sm=util_sm,
                util_mem=None if util is None else _percent(util.memory),
                mem_used_bytes=0 if memory is None else int(memory.used),
                mem_total_bytes=0 if memory is None else int(memory.total),
                power_w=None if power_mw is None else power_mw / 1000.0,
                power_limit_w=None if limit_mw is None else limit_mw / 1000.0,
                temp_c=None if temp is None else float(temp),
                processes=processes,
                sm_active=gpm.get("sm_active"),
                sm_occupancy=gpm.get("sm_occupancy"),
                tensor_active=gpm.get("tensor_active"),
                dram_active=gpm.get("dram_active"),
            )
        except ValidationError as exc:
            # Should not happen with sane NVML values; count it rather than stop the node.
            self._stats.errors["InvalidSample"] += 1
            log.warning("dropping sample of %s: %s", uuid, exc)
            return None

    def _read_processes(
        self, handle: Any, uuid: str, ts: float, device_util: float | None, live: set[int]
    ) -> list[ProcessSample]:
        memory: dict[int, int] = {}
        for kind in ("compute", "graphics"):
            for info in self._running_processes(kind, handle):
                used = info.usedGpuMemory or 0  # None under WDDM or without privileges
                # A process with compute and graphics contexts appears in both lists.
                pid = info.pid
                memory[pid] = max(memory.get(pid, 0), int(used))
        if not memory:
            return []
        utils = self._process_utilization(handle, uuid, ts, device_util, memory.keys())
        processes: list[ProcessSample] = []
        previous = self._processes.get(uuid, _NONE_KNOWN)
        seen = self._processes_now[uuid] = {}
        attribute = self.attribute
        for pid, used in memory.items():
            try:
                found = attribute(pid)
            except Exception as exc:  # attribution is best effort: the sample matters more
                found = self._attribution_failed(pid, exc)
            util = utils.get(pid)
            known = previous.get(pid)
            if (
                known is not None
                and known[0] is found
                and found.name  # else the name comes from NVML, which may say otherwise now
            ):
                if known[1] == util and known[2] == used:
                    # A frozen model with the same inputs: the same sample.
                    process = known[3]
                elif 0 <= used <= UINT64_MAX and (util is None or 0.0 <= util <= 1.0):
                    # The same process, new measures: its name and labels are not checked again.
                    process = _with_measures(known[3], util, used)
                else:
                    process = _validate_process(
                        {**known[3].__dict__, "util_sm": util, "mem_used_bytes": used}
                    )
            else:
                name = found.name
                if not name:
                    name = self.nvml_query("nvmlSystemGetProcessName", pid, default="") or ""
                    name = os.path.basename(name)
                process = _validate_process(
                    {
                        "pid": pid,
                        "name": name[:256],
                        "util_sm": util,
                        "mem_used_bytes": used,
                        "container_id": found.container_id,
                        "pod_uid": found.pod_uid,
                        "labels": found.labels,
                    }
                )
            seen[pid] = (found, util, used, process)
            processes.append(process)
            live.add(pid)
        self._stats.processes += len(processes)
        return processes

    def _running_processes(self, kind: str, handle: Any) -> list[Any]:
        """The device's processes of `kind`, through the newest call the driver has."""
        calls = self._process_calls[kind]
        while calls:
            value, error = self._call(
                calls[0],
                handle,
                expected=frozenset({"FunctionNotFound"}) if calls[1:] else frozenset(),
            )
            if error == "FunctionNotFound" and len(calls) > 1:
                log.warning(
                    "the NVIDIA driver lacks %s (older than R510?): using %s", calls[0], calls[1]
                )
                calls.pop(0)
                continue
            return list(value or ())
        return []

    def _attribution_failed(self, pid: int, exc: Exception) -> ProcessAttribution:
        self._stats.errors["AttributionFailed"] += 1
        log.debug("attribution of pid %s failed: %r", pid, exc)
        return UNKNOWN

    def _process_utilization(
        self, handle: Any, uuid: str, ts: float, device_util: float | None, pids: Iterable[int]
    ) -> dict[int, float | None]:
        """Mean SM utilization per PID over this sample's interval only.

        NVML returns samples newer than the last-seen timestamp, one per process that had
        non-zero utilization. So: a PID with samples gets their mean; a PID without one
        while others have some was idle (0.0); no sample at all (NOT_FOUND) is 0.0 when the
        device itself was idle and unknown (None) otherwise; any other error is unknown.
        """
        since = max(self._last_seen_us.get(uuid, 0), int(ts * 1_000_000))
        # NotFound is "no sample since `since`"; some drivers say Success (NVMLError 0)
        # instead; InsufficientSize means samples arrived between pynvml's two calls.
        expected = frozenset({"NotFound", "NVMLError0", "InsufficientSize"})
        samples, error = self._call(
            "nvmlDeviceGetProcessUtilization", handle, since, expected=expected
        )
        if error == "InsufficientSize":
            samples, error = self._call(
                "nvmlDeviceGetProcessUtilization",
                handle,
                since,
                expected=expected - {"InsufficientSize"},
            )
        if error == "NVMLError0":
            error = "NotFound"
        if error == "NotFound" and device_util == 0.0:
            return dict.fromkeys(pids, 0.0)  # an idle GPU: nothing to sample, not missing
        if error is not None:
            if error == "NotFound":  # the device was busy, yet no sample: count what we miss
                self._stats.errors[error] += 1
                self._stats.errors_by_call[f"nvmlDeviceGetProcessUtilization:{error}"] += 1
            return dict.fromkeys(pids, None)
        sums: dict[int, float] = {}
        counts: dict[int, int] = {}
        newest = since
        for sample in samples:
            pid, stamp, sm = read_util_sample(sample)
            if stamp <= since:  # never count a window twice, whatever the driver returns
                continue
            if stamp > newest:  # drivers do not return samples in time order
                newest = stamp
            if sm > 100:  # seen from drivers for zombie processes: not a measurement
                self._stats.errors["InvalidUtilizationSample"] += 1
                continue
            sums[pid] = sums.get(pid, 0.0) + sm
            counts[pid] = counts.get(pid, 0) + 1
        self._last_seen_us[uuid] = newest
        return {
            pid: (min(1.0, sums[pid] / counts[pid] / 100.0) if pid in counts else 0.0)
            for pid in pids
        }
