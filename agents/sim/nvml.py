"""A simulated NVML for one node of a scenario, with pynvml's names, types and errors.

`SimulatedNvml(scenario, node, clock)` answers the pynvml calls the reader makes, from the
scenario engine at scenario time `clock()`: the same function names and arguments, the same
return types (pynvml's ctypes structures, its process-info objects, plain ints and strings)
and the same exceptions (`pynvml.NVMLError` subclasses such as `NVMLError_NotSupported`).
It follows NVML's documented behaviour where it matters to the reader:

- MIG: `nvmlDeviceGetMigMode` gives `[current, pending]`; instances are reached with
  `nvmlDeviceGetMaxMigDeviceCount` and `nvmlDeviceGetMigDeviceHandleByIndex` (NOT_FOUND for an
  empty index); a MIG handle's name is "<parent name> MIG <profile>"; device utilization,
  per-process utilization, power and temperature are NOT_SUPPORTED on MIG handles, and
  utilization also on a MIG-enabled parent.
- `nvmlDeviceGetProcessUtilization(handle, lastSeen)` returns only samples newer than
  `lastSeen` (microseconds), one per process with non-zero utilization, and raises
  NOT_FOUND when there is none.
- Power in milliwatts, memory in bytes, utilization in whole percent.

Tests can make it misbehave the way real drivers do: `fail()` a call with an NVML error code,
`remove_function()` to get FunctionNotFound, `kill()` a process, `before_call` to change the
world between two calls of one read.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pynvml

from gpuledger.agents.attribution import (
    UNKNOWN,
    ProcessAttribution,
    labels_from_environ,
    parse_cgroup,
)
from gpuledger.agents.gpm import METRICS
from gpuledger.agents.sim.engine import Scenario
from gpuledger.agents.sim.hardware import GpuState, MigState, NodeHardware, ProcessState

_NOT_AVAILABLE_UINT = 0xFFFFFFFF
COMM_LEN = 15  # TASK_COMM_LEN - 1


@dataclass(frozen=True)
class SimHandle:
    """A device handle: a GPU, or a MIG device under it."""

    node: str
    index: int
    mig: int | None = None


@dataclass
class Fault:
    function: str
    code: int
    uuid: str | None = None
    remaining: int | None = None  # None = every call


def _error(code: int) -> pynvml.NVMLError:
    return pynvml.NVMLError(code)


@dataclass
class _GpmSample:
    buffer: ctypes.c_uint64  # what the caller's nvmlGpmSample_t points at
    device: tuple[int, int | None] | None = None  # (GPU index, MIG index)
    t: float = 0.0


_GPM_FIELDS = dict(METRICS)  # metric id -> Activity's (and GpuSample's) field


def _address(sample: Any) -> int:
    return ctypes.cast(sample, ctypes.c_void_p).value or 0


class SimulatedNvml:
    """pynvml, simulated for `node` of `scenario` at scenario time `clock()`."""

    NVMLError = pynvml.NVMLError
    NVMLLibraryMismatchError = pynvml.NVMLLibraryMismatchError

    def __init__(self, scenario: Scenario, node: str, clock: Callable[[], float]) -> None:
        scenario.gpus(node)  # raises KeyError naming the known nodes
        self.scenario = scenario
        self.node = node
        self.clock = clock
        self.faults: list[Fault] = []
        self.missing: set[str] = set()
        self.killed: set[int] = set()
        self.before_call: Callable[[str, SimHandle | None], None] | None = None
        self._initialized = 0
        self._cached: NodeHardware | None = None
        self._gpm_samples: dict[int, _GpmSample] = {}
        self._gpm_span: tuple[tuple[float, float] | None, dict[Any, Any]] = (None, {})

    # -- what pynvml has that we do not simulate

    def __getattr__(self, name: str) -> Any:
        if name.startswith(("NVML_", "c_nvml", "NVMLError_")):
            return getattr(pynvml, name)
        if name.startswith("nvml"):

            def not_in_library(*args: object, **kwargs: object) -> Any:
                raise _error(pynvml.NVML_ERROR_FUNCTION_NOT_FOUND)

            return not_in_library
        raise AttributeError(name)

    # -- fault injection for tests

    def fail(
        self, function: str, code: int, *, uuid: str | None = None, times: int | None = None
    ) -> None:
        """Make `function` raise NVML error `code` (for one device, for `times` calls)."""
        self.faults.append(Fault(function, code, uuid, times))

    def remove_function(self, function: str) -> None:
        """Behave like a driver whose library lacks `function` (FunctionNotFound)."""
        self.missing.add(function)

    def kill(self, pid: int) -> None:
        """The process exits: it leaves the process lists, the samples and /proc."""
        self.killed.add(pid)

    # -- plumbing

    def _enter(self, function: str, handle: SimHandle | None = None) -> NodeHardware:
        if self.before_call is not None:
            self.before_call(function, handle)
        if not self._initialized:
            raise _error(pynvml.NVML_ERROR_UNINITIALIZED)
        if function in self.missing:
            raise _error(pynvml.NVML_ERROR_FUNCTION_NOT_FOUND)
        hardware = self._hardware()
        if handle is not None and (not isinstance(handle, SimHandle) or handle.node != self.node):
            raise _error(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        for fault in self.faults:
            if fault.function != function or fault.remaining == 0:
                continue
            if fault.uuid is not None and (handle is None or self._uuid(handle) != fault.uuid):
                continue
            if fault.remaining is not None:
                fault.remaining -= 1
            raise _error(fault.code)
        return hardware

    def _hardware(self) -> NodeHardware:
        t = self.clock()
        if self._cached is None or self._cached.t != t:
            self._cached = self.scenario.hardware(self.node, t)
        return self._cached

    def _hardware_at(self, t: float) -> NodeHardware:
        if self._cached is not None and self._cached.t == t:
            return self._cached
        return self.scenario.hardware(self.node, t)

    def _gpu(self, hardware: NodeHardware, handle: SimHandle) -> GpuState:
        return hardware.gpus[handle.index]

    def _mig(self, hardware: NodeHardware, handle: SimHandle) -> MigState:
        assert handle.mig is not None
        return hardware.gpus[handle.index].mig[handle.mig]

    def _uuid(self, handle: SimHandle) -> str:
        gpu = self.scenario.gpus(self.node)[handle.index]
        return gpu.uuid if handle.mig is None else gpu.mig[handle.mig].uuid

    def _not_on_mig(self, handle: SimHandle) -> None:
        if handle.mig is not None:
            raise _error(pynvml.NVML_ERROR_NOT_SUPPORTED)

    # -- initialisation and system

    def nvmlInit(self) -> None:
        self._initialized += 1

    def nvmlInitWithFlags(self, flags: int) -> None:
        self._initialized += 1

    def nvmlShutdown(self) -> None:
        if not self._initialized:
            raise _error(pynvml.NVML_ERROR_UNINITIALIZED)
        self._initialized -= 1

    def nvmlSystemGetDriverVersion(self) -> str:
        return self._enter("nvmlSystemGetDriverVersion").driver_version

    def nvmlSystemGetProcessName(self, pid: int) -> str:
        found = self._process(self._enter("nvmlSystemGetProcessName"), pid)
        if found is None:
            raise _error(pynvml.NVML_ERROR_NOT_FOUND)
        return found.name

    # -- devices

    def nvmlDeviceGetCount(self) -> int:
        return len(self._enter("nvmlDeviceGetCount").gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> SimHandle:
        hardware = self._enter("nvmlDeviceGetHandleByIndex")
        if not 0 <= index < len(hardware.gpus):
            raise _error(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return SimHandle(self.node, index)

    def nvmlDeviceGetHandleByUUID(self, uuid: str) -> SimHandle:
        hardware = self._enter("nvmlDeviceGetHandleByUUID")
        for state in hardware.gpus:
            if state.gpu.uuid == uuid:
                return SimHandle(self.node, state.gpu.index)
            for mig in state.mig:
                if mig.instance.uuid == uuid:
                    return SimHandle(self.node, state.gpu.index, mig.instance.index)
        raise _error(pynvml.NVML_ERROR_NOT_FOUND)

    def nvmlDeviceGetName(self, handle: SimHandle) -> str:
        gpu = self._gpu(self._enter("nvmlDeviceGetName", handle), handle).gpu
        if handle.mig is None:
            return gpu.name
        return f"{gpu.name} MIG {gpu.mig[handle.mig].profile}"

    def nvmlDeviceGetUUID(self, handle: SimHandle) -> str:
        self._enter("nvmlDeviceGetUUID", handle)
        return self._uuid(handle)

    def nvmlDeviceGetIndex(self, handle: SimHandle) -> int:
        self._enter("nvmlDeviceGetIndex", handle)
        # On a MIG handle NVML gives the MIG device index under its parent.
        return handle.index if handle.mig is None else handle.mig

    def nvmlDeviceGetMemoryInfo(self, handle: SimHandle, version: int | None = None) -> Any:
        hardware = self._enter("nvmlDeviceGetMemoryInfo", handle)
        if handle.mig is None:
            state = self._gpu(hardware, handle)
            total, used = state.gpu.memory_total_bytes, state.used_memory_bytes
        else:
            mig = self._mig(hardware, handle)
            total, used = mig.instance.memory_total_bytes, mig.used_memory_bytes
        if version:
            memory: Any = pynvml.c_nvmlMemory_v2_t()
            memory.version = version
            memory.reserved = 0
        else:
            memory = pynvml.c_nvmlMemory_t()
        memory.total, memory.used, memory.free = total, used, total - used
        return memory

    def nvmlDeviceGetUtilizationRates(self, handle: SimHandle) -> Any:
        hardware = self._enter("nvmlDeviceGetUtilizationRates", handle)
        self._not_on_mig(handle)
        state = self._gpu(hardware, handle)
        if state.gpu.mig_enabled:
            raise _error(pynvml.NVML_ERROR_NOT_SUPPORTED)
        util = pynvml.c_nvmlUtilization_t()
        util.gpu = round(100 * state.util_gpu)
        util.memory = round(100 * state.util_mem)
        return util

    def nvmlDeviceGetPowerUsage(self, handle: SimHandle) -> int:
        hardware = self._enter("nvmlDeviceGetPowerUsage", handle)
        self._not_on_mig(handle)
        return round(self._gpu(hardware, handle).power_w * 1000)

    def nvmlDeviceGetEnforcedPowerLimit(self, handle: SimHandle) -> int:
        hardware = self._enter("nvmlDeviceGetEnforcedPowerLimit", handle)
        self._not_on_mig(handle)
        return round(self._gpu(hardware, handle).gpu.power_limit_w * 1000)

    def nvmlDeviceGetPowerManagementLimit(self, handle: SimHandle) -> int:
        hardware = self._enter("nvmlDeviceGetPowerManagementLimit", handle)
        self._not_on_mig(handle)
        return round(self._gpu(hardware, handle).gpu.power_limit_w * 1000)

    def nvmlDeviceGetTemperature(self, handle: SimHandle, sensor: int) -> int:
        hardware = self._enter("nvmlDeviceGetTemperature", handle)
        self._not_on_mig(handle)
        if sensor != pynvml.NVML_TEMPERATURE_GPU:
            raise _error(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return self._gpu(hardware, handle).temp_c

    # -- processes

    def _processes(self, function: str, handle: SimHandle, kind: str) -> list[Any]:
        hardware = self._enter(function, handle)
        state = self._gpu(hardware, handle)
        placed: list[tuple[ProcessState, int, int]] = []
        if handle.mig is not None:
            mig = state.mig[handle.mig]
            placed = [(p, mig.instance.index + 1, 0) for p in mig.processes]
        elif state.gpu.mig_enabled:
            # The parent of MIG devices lists every instance's processes (with privileges).
            placed = [(p, m.instance.index + 1, 0) for m in state.mig for p in m.processes]
        else:
            placed = [(p, _NOT_AVAILABLE_UINT, _NOT_AVAILABLE_UINT) for p in state.processes]
        infos = []
        for process, gi, ci in placed:
            if process.kind != kind or process.pid in self.killed:
                continue
            info = pynvml.c_nvmlProcessInfo_v3_t()
            info.pid = process.pid
            info.usedGpuMemory = process.used_memory_bytes
            info.gpuInstanceId = gi
            info.computeInstanceId = ci
            infos.append(pynvml.nvmlStructToFriendlyObject(info))
        return infos

    def nvmlDeviceGetComputeRunningProcesses(self, handle: SimHandle) -> list[Any]:
        return self._processes("nvmlDeviceGetComputeRunningProcesses", handle, "compute")

    def nvmlDeviceGetComputeRunningProcesses_v3(self, handle: SimHandle) -> list[Any]:
        return self._processes("nvmlDeviceGetComputeRunningProcesses_v3", handle, "compute")

    def nvmlDeviceGetGraphicsRunningProcesses(self, handle: SimHandle) -> list[Any]:
        return self._processes("nvmlDeviceGetGraphicsRunningProcesses", handle, "graphics")

    def nvmlDeviceGetGraphicsRunningProcesses_v3(self, handle: SimHandle) -> list[Any]:
        return self._processes("nvmlDeviceGetGraphicsRunningProcesses_v3", handle, "graphics")

    # `timeStamp`: pynvml's own parameter name, kept so keyword calls work the same.
    def nvmlDeviceGetProcessUtilization(self, handle: SimHandle, timeStamp: int) -> list[Any]:
        hardware = self._enter("nvmlDeviceGetProcessUtilization", handle)
        self._not_on_mig(handle)
        if self._gpu(hardware, handle).gpu.mig_enabled:
            raise _error(pynvml.NVML_ERROR_NOT_SUPPORTED)
        samples = [
            s
            for s in self.scenario.process_utilization(
                self.node, handle.index, timeStamp / 1_000_000, hardware.t
            )
            if s.pid not in self.killed and s.ts_us > timeStamp
        ]
        if not samples:
            raise _error(pynvml.NVML_ERROR_NOT_FOUND)
        out = []
        for s in samples:
            sample = pynvml.c_nvmlProcessUtilizationSample_t()
            sample.pid = s.pid
            sample.timeStamp = s.ts_us
            sample.smUtil = s.sm_util
            sample.memUtil = s.mem_util
            sample.encUtil = 0
            sample.decUtil = 0
            out.append(sample)
        return out

    # -- MIG

    def nvmlDeviceGetMigMode(self, handle: SimHandle) -> list[int]:
        hardware = self._enter("nvmlDeviceGetMigMode", handle)
        if handle.mig is not None:
            raise _error(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        gpu = self._gpu(hardware, handle).gpu
        if gpu.max_mig_devices == 0:
            raise _error(pynvml.NVML_ERROR_NOT_SUPPORTED)
        mode = pynvml.NVML_DEVICE_MIG_ENABLE if gpu.mig_enabled else pynvml.NVML_DEVICE_MIG_DISABLE
        return [mode, mode]

    def nvmlDeviceGetMaxMigDeviceCount(self, handle: SimHandle) -> int:
        hardware = self._enter("nvmlDeviceGetMaxMigDeviceCount", handle)
        if handle.mig is not None:
            raise _error(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        gpu = self._gpu(hardware, handle).gpu
        return gpu.max_mig_devices if gpu.mig_enabled else 0

    def nvmlDeviceGetMigDeviceHandleByIndex(self, handle: SimHandle, index: int) -> SimHandle:
        hardware = self._enter("nvmlDeviceGetMigDeviceHandleByIndex", handle)
        gpu = self._gpu(hardware, handle).gpu
        if handle.mig is not None or not gpu.mig_enabled:
            raise _error(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        if not 0 <= index < gpu.max_mig_devices:
            raise _error(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        if index >= len(gpu.mig):
            raise _error(pynvml.NVML_ERROR_NOT_FOUND)
        return SimHandle(self.node, handle.index, index)

    def nvmlDeviceIsMigDeviceHandle(self, handle: SimHandle) -> ctypes.c_uint:
        self._enter("nvmlDeviceIsMigDeviceHandle", handle)
        # pynvml returns the c_uint itself, not its value
        return ctypes.c_uint(0 if handle.mig is None else 1)

    def nvmlDeviceGetDeviceHandleFromMigDeviceHandle(self, handle: SimHandle) -> SimHandle:
        self._enter("nvmlDeviceGetDeviceHandleFromMigDeviceHandle", handle)
        if handle.mig is None:
            raise _error(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return SimHandle(self.node, handle.index)

    def nvmlDeviceGetGpuInstanceId(self, handle: SimHandle) -> int:
        self._enter("nvmlDeviceGetGpuInstanceId", handle)
        if handle.mig is None:
            raise _error(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return handle.mig + 1

    def nvmlDeviceGetComputeInstanceId(self, handle: SimHandle) -> int:
        self._enter("nvmlDeviceGetComputeInstanceId", handle)
        if handle.mig is None:
            raise _error(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return 0

    def nvmlDeviceGetAttributes(self, handle: SimHandle) -> Any:
        hardware = self._enter("nvmlDeviceGetAttributes", handle)
        gpu = self._gpu(hardware, handle).gpu
        attrs = pynvml.c_nvmlDeviceAttributes()
        if handle.mig is None:
            slices = gpu.max_mig_devices or 1
            memory = gpu.memory_total_bytes
        else:
            slices = gpu.mig[handle.mig].slices
            memory = gpu.mig[handle.mig].memory_total_bytes
        attrs.gpuInstanceSliceCount = slices
        attrs.computeInstanceSliceCount = slices
        attrs.multiprocessorCount = 14 * slices
        attrs.memorySizeMB = memory // (1024 * 1024)
        return attrs

    nvmlDeviceGetAttributes_v2 = nvmlDeviceGetAttributes

    # -- GPU Performance Monitoring (Hopper and later)

    def nvmlGpmQueryDeviceSupport(self, handle: SimHandle) -> Any:
        hardware = self._enter("nvmlGpmQueryDeviceSupport", handle)
        support = pynvml.c_nvmlGpmSupport_t()
        support.version = pynvml.NVML_GPM_SUPPORT_VERSION
        support.isSupportedDevice = int(self._gpu(hardware, handle).gpu.gpm)
        return support

    def nvmlGpmSampleAlloc(self) -> Any:
        """A real `nvmlGpmSample_t` pointer (to a buffer this object keeps), so that callers
        fill pynvml's `c_nvmlGpmMetricsGet_t` with it as they would with the driver's."""
        buffer = ctypes.c_uint64(0)
        sample = ctypes.cast(ctypes.pointer(buffer), pynvml.c_nvmlGpmSample_t)
        self._gpm_samples[ctypes.addressof(buffer)] = _GpmSample(buffer)
        return sample

    def nvmlGpmSampleFree(self, sample: Any) -> None:
        if self._gpm_samples.pop(_address(sample), None) is None:
            raise _error(pynvml.NVML_ERROR_INVALID_ARGUMENT)

    def nvmlGpmSampleGet(self, handle: SimHandle, sample: Any) -> Any:
        hardware = self._enter("nvmlGpmSampleGet", handle)
        return self._gpm_fill(hardware, handle, None, sample)

    def nvmlGpmMigSampleGet(self, handle: SimHandle, gpuInstanceId: int, sample: Any) -> Any:
        hardware = self._enter("nvmlGpmMigSampleGet", handle)
        return self._gpm_fill(hardware, handle, gpuInstanceId, sample)

    def _gpm_fill(
        self, hardware: NodeHardware, handle: SimHandle, instance_id: int | None, sample: Any
    ) -> Any:
        slot = self._gpm_samples.get(_address(sample))
        if slot is None or handle.mig is not None:
            raise _error(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        state = self._gpu(hardware, handle)
        if not state.gpu.gpm:
            raise _error(pynvml.NVML_ERROR_NOT_SUPPORTED)
        mig = None
        if instance_id is not None:
            mig = instance_id - 1  # nvmlDeviceGetGpuInstanceId gives the MIG index + 1
            if not state.gpu.mig_enabled or not 0 <= mig < len(state.mig):
                raise _error(pynvml.NVML_ERROR_NOT_FOUND)
        slot.device, slot.t = (handle.index, mig), hardware.t
        return sample

    def nvmlGpmMetricsGet(self, request: Any) -> Any:
        """Each metric's mean between the two samples (the rate at the second one when they
        were taken at the same time), as the driver's counters give it."""
        self._enter("nvmlGpmMetricsGet")
        if request.version != pynvml.NVML_GPM_METRICS_GET_VERSION:
            raise _error(pynvml.NVML_ERROR_ARGUMENT_VERSION_MISMATCH)
        first = self._gpm_samples.get(_address(request.sample1))
        second = self._gpm_samples.get(_address(request.sample2))
        if first is None or second is None or first.device is None:
            raise _error(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        if first.device != second.device or request.numMetrics > len(request.metrics):
            raise _error(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        index, mig = first.device
        span = second.t - first.t
        if span > 0:
            span_key = (first.t, second.t)
            if self._gpm_span[0] != span_key:  # one integral serves every device of a read
                self._gpm_span = (span_key, self.scenario.activity_between(self.node, *span_key))
            mean = self._gpm_span[1][(index, mig)]
        else:
            state = self._hardware_at(second.t).gpus[index]
            mean, span = (state.activity if mig is None else state.mig[mig].activity), 1.0
        for i in range(request.numMetrics):
            metric = request.metrics[i]
            field = _GPM_FIELDS.get(metric.metricId)
            if field is None:
                metric.nvmlReturn = pynvml.NVML_ERROR_NOT_SUPPORTED
                metric.value = 0.0
                continue
            metric.nvmlReturn = pynvml.NVML_SUCCESS
            metric.value = min(100.0, max(0.0, 100.0 * getattr(mean, field) / span))
        return request

    # -- process attribution from the scenario (simulated PIDs do not exist in /proc)

    def _process(self, hardware: NodeHardware, pid: int) -> ProcessState | None:
        if pid in self.killed:
            return None
        for state in hardware.gpus:
            for process in state.processes:
                if process.pid == pid:
                    return process
        return None

    def attribute(self, pid: int) -> ProcessAttribution:
        """What /proc would say about a simulated process, parsed by the real parsers."""
        process = self._process(self._hardware(), pid)
        if process is None:
            return UNKNOWN
        container_id, pod_uid = parse_cgroup(process.cgroup)
        return ProcessAttribution(
            name=process.name[:COMM_LEN],  # /proc/<pid>/comm keeps 15 characters
            container_id=container_id,
            pod_uid=pod_uid,
            labels=labels_from_environ(process.env),
        )
