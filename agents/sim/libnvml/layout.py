"""The shared-memory state between the hardware feed (Python) and the simulated libnvidia-ml.

This module is the one definition of the layout: `NvmlState` and its parts are ctypes
structures that the feed writes into an mmap'd file, and `c_header()` turns the same
definitions into the C header the library is compiled with (with `_Static_assert`s on every
size and offset), so the two sides cannot drift apart.

Concurrency is a seqlock: the writer makes `seq` odd, writes, makes it even again; the
library reads a field set, then checks that `seq` did not move (and retries if it did).
"""

from __future__ import annotations

import ctypes
from typing import Any

from gpuledger.agents.gpm import METRICS

MAGIC = 0x4C4D564E  # "NVML" read as a little-endian u32
LAYOUT_VERSION = 2

MAX_GPUS = 16
MAX_MIG = 7
MAX_PROCS = 128  # per GPU, MIG instances' processes included
MAX_SAMPLES = 1024  # per-process utilization samples the driver buffer holds, per GPU
MAX_FAULTS = 16
NAME_LEN = 96  # NVML_DEVICE_NAME_V2_BUFFER_SIZE
UUID_LEN = 96  # NVML_DEVICE_UUID_V2_BUFFER_SIZE
PROFILE_LEN = 32
PROCESS_NAME_LEN = 64
FUNCTION_LEN = 64
DRIVER_LEN = 80  # NVML_SYSTEM_DRIVER_VERSION_BUFFER_SIZE

KIND_COMPUTE = 0
KIND_GRAPHICS = 1
NO_MIG = -1
ALWAYS = -1  # a fault's `remaining`: every call

# Driver behaviours seen in the field, off by default (the documented behaviour is the default).
QUIRK_UTIL_COUNT_IS_CAPACITY = 1  # first nvmlDeviceGetProcessUtilization says 100, not the count
QUIRK_UTIL_UNSORTED = 2  # samples come newest first
QUIRK_UTIL_IGNORES_LAST_SEEN = 4  # samples at or before lastSeenTimeStamp come back again
UTIL_CAPACITY = 100
# The GPM metrics the library measures, the agent's, in this order in `Gpm.acc` and `Gpm.rate`.
GPM_METRIC_IDS = tuple(metric_id for metric_id, _ in METRICS)


class Process(ctypes.Structure):
    _fields_ = (
        ("pid", ctypes.c_uint32),
        ("kind", ctypes.c_uint32),
        ("mig", ctypes.c_int32),  # index of the MIG instance it runs in, or NO_MIG
        ("reserved", ctypes.c_uint32),
        ("used_memory", ctypes.c_uint64),
        ("name", ctypes.c_char * PROCESS_NAME_LEN),
    )


class UtilSample(ctypes.Structure):
    _fields_ = (
        ("pid", ctypes.c_uint32),
        ("sm_util", ctypes.c_uint32),
        ("mem_util", ctypes.c_uint32),
        ("reserved", ctypes.c_uint32),
        ("ts_us", ctypes.c_uint64),
    )


class Gpm(ctypes.Structure):
    """A device's GPM counters: each metric's activity integrated over time (fraction x
    seconds) up to the world's `gpm_time_us`, and its rate (fraction) in the last second.
    A GPM sample copies them; two samples give the mean rate between them."""

    _fields_ = (
        ("acc", ctypes.c_double * len(GPM_METRIC_IDS)),
        ("rate", ctypes.c_double * len(GPM_METRIC_IDS)),
    )


class MigInstance(ctypes.Structure):
    _fields_ = (
        ("uuid", ctypes.c_char * UUID_LEN),
        ("profile", ctypes.c_char * PROFILE_LEN),
        ("slices", ctypes.c_uint32),  # the GPU's compute slices it holds: the 3 of "3g.40gb"
        ("gpu_instance_id", ctypes.c_uint32),  # what process info and GPM call it
        ("memory_total", ctypes.c_uint64),
        ("memory_used", ctypes.c_uint64),
        ("gpm", Gpm),
    )


class Gpu(ctypes.Structure):
    _fields_ = (
        ("name", ctypes.c_char * NAME_LEN),
        ("uuid", ctypes.c_char * UUID_LEN),
        ("memory_total", ctypes.c_uint64),
        ("memory_used", ctypes.c_uint64),
        ("util_gpu", ctypes.c_uint32),  # percent
        ("util_mem", ctypes.c_uint32),
        ("power_mw", ctypes.c_uint32),
        ("power_limit_mw", ctypes.c_uint32),
        ("temp_c", ctypes.c_uint32),
        ("max_mig", ctypes.c_uint32),  # 0: the model has no MIG
        ("mig_enabled", ctypes.c_uint32),
        ("mig_count", ctypes.c_uint32),  # entries of `mig` in use
        ("process_count", ctypes.c_uint32),  # entries of `processes` in use
        ("sample_count", ctypes.c_uint32),  # entries of `samples` in use
        ("gpm_supported", ctypes.c_uint32),
        ("reserved", ctypes.c_uint32),  # padding: `gpm` starts 8-byte aligned
        ("gpm", Gpm),
        ("mig", MigInstance * MAX_MIG),
        ("processes", Process * MAX_PROCS),
        ("samples", UtilSample * MAX_SAMPLES),
    )


class World(ctypes.Structure):
    """What the hardware looks like: one of the two the state holds."""

    _fields_ = (
        ("clock_us", ctypes.c_uint64),  # the library's "now"; 0 = the real clock
        ("gpm_time_us", ctypes.c_uint64),  # the time the GPM counters stand at
        ("gpu_count", ctypes.c_uint32),
        ("quirks", ctypes.c_uint32),
        ("driver_version", ctypes.c_char * DRIVER_LEN),
        ("gpus", Gpu * MAX_GPUS),
    )


class Fault(ctypes.Structure):
    _fields_ = (
        ("function", ctypes.c_char * FUNCTION_LEN),  # C symbol, e.g. "nvmlDeviceGetPowerUsage"
        ("uuid", ctypes.c_char * UUID_LEN),  # only for this device ("" = any)
        ("code", ctypes.c_int32),  # the nvmlReturn_t to answer
        ("remaining", ctypes.c_int32),  # calls left to fail; ALWAYS = every call
    )


class NvmlState(ctypes.Structure):
    _fields_ = (
        ("magic", ctypes.c_uint32),
        ("layout_version", ctypes.c_uint32),
        ("seq", ctypes.c_uint64),
        ("calls", ctypes.c_uint64),  # every NVML call the library answered
        ("active", ctypes.c_uint32),  # which of `worlds` the library serves
        ("fault_count", ctypes.c_uint32),
        # The world changes between two calls: after `switch_after` more calls of
        # `switch_function`, the library serves the other world.
        ("switch_function", ctypes.c_char * FUNCTION_LEN),
        ("switch_after", ctypes.c_int32),
        ("reserved", ctypes.c_uint32),
        ("faults", Fault * MAX_FAULTS),
        ("worlds", World * 2),
    )


_C_TYPES: dict[Any, str] = {
    ctypes.c_double: "double",
    ctypes.c_uint32: "uint32_t",
    ctypes.c_int32: "int32_t",
    ctypes.c_uint64: "uint64_t",
}

_STRUCTS: tuple[tuple[type[ctypes.Structure], str], ...] = (
    (Process, "SimProcess"),
    (UtilSample, "SimUtilSample"),
    (Gpm, "SimGpm"),
    (MigInstance, "SimMig"),
    (Gpu, "SimGpu"),
    (World, "SimWorld"),
    (Fault, "SimFault"),
    (NvmlState, "SimState"),
)


def _c_field(ctype: Any, name: str) -> str:
    names = {cls: c_name for cls, c_name in _STRUCTS}
    if ctype in _C_TYPES:
        return f"{_C_TYPES[ctype]} {name};"
    if ctype in names:
        return f"{names[ctype]} {name};"
    element = ctype._type_
    if element is ctypes.c_char:
        return f"char {name}[{ctype._length_}];"
    if element in _C_TYPES:
        return f"{_C_TYPES[element]} {name}[{ctype._length_}];"
    return f"{names[element]} {name}[{ctype._length_}];"


def c_header() -> str:
    """The C declaration of the layout, with compile-time checks of every size and offset."""
    lines = [
        "/* Generated by agents/sim/libnvml/layout.py: do not edit. */",
        "#pragma once",
        "#include <stddef.h>",
        "#include <stdint.h>",
        f"#define SIM_MAGIC 0x{MAGIC:08X}u",
        f"#define SIM_LAYOUT_VERSION {LAYOUT_VERSION}u",
    ]
    for name, value in (
        ("MAX_GPUS", MAX_GPUS),
        ("MAX_MIG", MAX_MIG),
        ("MAX_PROCS", MAX_PROCS),
        ("MAX_SAMPLES", MAX_SAMPLES),
        ("MAX_FAULTS", MAX_FAULTS),
        ("KIND_COMPUTE", KIND_COMPUTE),
        ("KIND_GRAPHICS", KIND_GRAPHICS),
        ("NO_MIG", NO_MIG),
        ("ALWAYS", ALWAYS),
        ("QUIRK_UTIL_COUNT_IS_CAPACITY", QUIRK_UTIL_COUNT_IS_CAPACITY),
        ("QUIRK_UTIL_UNSORTED", QUIRK_UTIL_UNSORTED),
        ("QUIRK_UTIL_IGNORES_LAST_SEEN", QUIRK_UTIL_IGNORES_LAST_SEEN),
        ("UTIL_CAPACITY", UTIL_CAPACITY),
        ("GPM_METRIC_COUNT", len(GPM_METRIC_IDS)),
    ):
        lines.append(f"#define SIM_{name} ({value})")
    lines.append(f"#define SIM_GPM_METRIC_IDS {{{', '.join(map(str, GPM_METRIC_IDS))}}}")
    for cls, c_name in _STRUCTS:
        lines.append(f"typedef struct {c_name} {{")
        lines.extend(f"    {_c_field(field[1], field[0])}" for field in cls._fields_)
        lines.append(f"}} {c_name};")
        lines.append(f'_Static_assert(sizeof({c_name}) == {ctypes.sizeof(cls)}, "{c_name} size");')
        for field in cls._fields_:
            name = field[0]
            offset = getattr(cls, name).offset
            lines.append(
                f'_Static_assert(offsetof({c_name}, {name}) == {offset}, "{c_name}.{name} offset");'
            )
    return "\n".join(lines) + "\n"
