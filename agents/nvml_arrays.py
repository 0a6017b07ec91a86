"""NVML's arrays of processes and of their utilization samples, read straight from the
arrays' memory: the same library handle, symbols, ctypes structures, calls and errors as
pynvml, without an object per process (most of the agent's NVML time with many processes).
The reader (`agents/nvml.py`) uses these in place of pynvml's functions of the same names
when it talks to the real `pynvml`.
"""

from __future__ import annotations

import ctypes
import struct
from collections.abc import Callable
from typing import Any

import pynvml

_UTIL_SAMPLE = pynvml.c_nvmlProcessUtilizationSample_t
_UTIL_SAMPLE_SIZE = ctypes.sizeof(_UTIL_SAMPLE)


def _util_sample_layout() -> tuple[struct.Struct, tuple[int, int, int]]:
    """How to unpack (pid, timeStamp, smUtil) from a process utilization sample's memory:
    the fields at their offsets, and where each lands in the unpacked tuple."""
    fields = sorted(
        (getattr(_UTIL_SAMPLE, name).offset, name, ctype)
        for name, ctype in _UTIL_SAMPLE._fields_
        if name in ("pid", "timeStamp", "smUtil")
    )
    codes = {ctypes.c_uint: "I", ctypes.c_ulonglong: "Q"}
    fmt, position = "=", 0
    for offset, _, ctype in fields:
        fmt += f"{offset - position}x" if offset > position else ""
        fmt += codes[ctype]
        position = offset + ctypes.sizeof(ctype)
    fmt += f"{_UTIL_SAMPLE_SIZE - position}x"  # the whole sample: an array unpacks in one call
    order = [name for _, name, _ in fields]
    return struct.Struct(fmt), (
        order.index("pid"),
        order.index("timeStamp"),
        order.index("smUtil"),
    )


_UTIL_STRUCT, _UTIL_PICK = _util_sample_layout()


def read_util_sample(sample: Any) -> tuple[int, int, int]:
    """(pid, timeStamp, smUtil) of a process utilization sample.

    pynvml's structures answer every attribute through a Python-level `__getattribute__`;
    with hundreds of samples a second, unpacking the structure's own memory at its fields'
    offsets is several times cheaper. A tuple is one already read (`_direct_process_utilization`);
    anything else (a test double) is read by attribute.
    """
    if type(sample) is tuple:
        return sample
    if type(sample) is _UTIL_SAMPLE:
        values = _UTIL_STRUCT.unpack_from(sample)
        return values[_UTIL_PICK[0]], values[_UTIL_PICK[1]], values[_UTIL_PICK[2]]
    return int(sample.pid), int(sample.timeStamp), int(sample.smUtil)


def _direct_process_utilization(handle: Any, time_stamp: int) -> list[tuple[int, int, int]]:
    """pynvml's `nvmlDeviceGetProcessUtilization`, each sample as (pid, timeStamp, smUtil)
    read from the array's memory instead of a structure object per sample (tens per GPU).

    The same symbol, structure and calls as pynvml: the count (NULL array), then the array;
    the same errors (NVMLError(0) when the first call finds nothing to size).
    """
    fn = pynvml._nvmlGetFunctionPointer("nvmlDeviceGetProcessUtilization")
    count = ctypes.c_uint(0)
    stamp = ctypes.c_ulonglong(time_stamp)
    ret = fn(handle, None, ctypes.byref(count), stamp)
    if ret != pynvml.NVML_ERROR_INSUFFICIENT_SIZE:
        raise pynvml.NVMLError(ret)
    size = count.value
    samples = (_UTIL_SAMPLE * size)()
    ret = fn(handle, samples, ctypes.byref(count), stamp)
    if ret != pynvml.NVML_SUCCESS:
        raise pynvml.NVMLError(ret)
    view = memoryview(samples).cast("B")[: min(count.value, size) * _UTIL_SAMPLE_SIZE]
    if _UTIL_PICK == (0, 1, 2):  # the fields in this order in memory, as NVML lays them out
        return list(_UTIL_STRUCT.iter_unpack(view))
    a, b, c = _UTIL_PICK
    return [(values[a], values[b], values[c]) for values in _UTIL_STRUCT.iter_unpack(view)]


# nvmlProcessInfo_t (pynvml's c_nvmlProcessInfo_v3_t, the same layout as the _v2 structure):
# (pid, usedGpuMemory) unpacked from the array's memory, as for the utilization samples.
_PROCESS_INFO = pynvml.c_nvmlProcessInfo_v3_t
_PROCESS_INFO_SIZE = ctypes.sizeof(_PROCESS_INFO)
_PROCESS_INFO_ROWS = struct.Struct(
    f"=I{_PROCESS_INFO.usedGpuMemory.offset - 4}xQ"
    f"{_PROCESS_INFO_SIZE - _PROCESS_INFO.usedGpuMemory.offset - 8}x"
)
_NOT_AVAILABLE = 0xFFFFFFFFFFFFFFFF  # NVML_VALUE_NOT_AVAILABLE: WDDM, or no privileges


class _ProcessInfo:
    """A running process as the reader needs it: pid and used memory (None if unknown)."""

    __slots__ = ("pid", "usedGpuMemory")

    def __init__(self, pid: int, used: int) -> None:
        self.pid = pid
        self.usedGpuMemory: int | None = None if used == _NOT_AVAILABLE else used


def _direct_process_list(function: str) -> Callable[[Any], list[_ProcessInfo]]:
    """pynvml's `nvmlDeviceGetComputeRunningProcesses_v3` protocol, without its per-process
    conversion to `nvmlFriendlyObject` (most of the agent's NVML time with many processes).

    The same library handle, symbol and ctypes structure as pynvml; the same two calls: the
    count (NULL array), then an oversized array in case processes start in between.
    """

    def call(handle: Any) -> list[_ProcessInfo]:
        fn = pynvml._nvmlGetFunctionPointer(function)
        count = ctypes.c_uint(0)
        ret = fn(handle, ctypes.byref(count), None)
        if ret == pynvml.NVML_SUCCESS:
            return []
        if ret != pynvml.NVML_ERROR_INSUFFICIENT_SIZE:
            raise pynvml.NVMLError(ret)
        count.value = count.value * 2 + 5
        infos = (_PROCESS_INFO * count.value)()
        ret = fn(handle, ctypes.byref(count), infos)
        if ret != pynvml.NVML_SUCCESS:
            raise pynvml.NVMLError(ret)
        view = memoryview(infos).cast("B")[: count.value * _PROCESS_INFO_SIZE]
        return [_ProcessInfo(pid, used) for pid, used in _PROCESS_INFO_ROWS.iter_unpack(view)]

    return call


DIRECT_CALLS: dict[str, Callable[..., Any]] = {
    name: _direct_process_list(symbol)
    for name, symbol in (
        ("nvmlDeviceGetComputeRunningProcesses", "nvmlDeviceGetComputeRunningProcesses_v3"),
        ("nvmlDeviceGetGraphicsRunningProcesses", "nvmlDeviceGetGraphicsRunningProcesses_v3"),
        ("nvmlDeviceGetComputeRunningProcesses_v2", "nvmlDeviceGetComputeRunningProcesses_v2"),
        ("nvmlDeviceGetGraphicsRunningProcesses_v2", "nvmlDeviceGetGraphicsRunningProcesses_v2"),
    )
}
DIRECT_CALLS["nvmlDeviceGetProcessUtilization"] = _direct_process_utilization
