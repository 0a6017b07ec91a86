"""GPU Performance Monitoring (NVML GPM, Hopper and later): SM activity, SM occupancy, tensor
activity and DRAM bandwidth of a GPU or a MIG instance over each read's interval.

NVML's busy time (`nvmlDeviceGetUtilizationRates`) is the share of time in which any kernel
ran: one tiny kernel in a loop reads 100 %, and a MIG instance has none at all. GPM counts what
the SMs did. Its protocol: allocate two sample buffers per device, take a sample each read
(`nvmlGpmSampleGet`, or `nvmlGpmMigSampleGet` with the parent and the GPU instance id), and ask
`nvmlGpmMetricsGet` for the metrics between the previous sample and this one.

Every call goes through the reader's guarded `call`, so a GPU without GPM, a driver without
the functions or a failed sample gives `None`, never an exception.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import pynvml

# (NVML metric id, GpuSample field), in the order they are asked for.
METRICS: tuple[tuple[int, str], ...] = (
    (pynvml.NVML_GPM_METRIC_SM_UTIL, "sm_active"),
    (pynvml.NVML_GPM_METRIC_SM_OCCUPANCY, "sm_occupancy"),
    (pynvml.NVML_GPM_METRIC_ANY_TENSOR_UTIL, "tensor_active"),
    (pynvml.NVML_GPM_METRIC_DRAM_BW_UTIL, "dram_active"),
)

# The reader's guarded NVML call: (function name, *args, expected=...) -> (value, error name).
GuardedCall = Callable[..., tuple[Any, str | None]]

# Errors that say "no GPM here", the normal answer of a pre-Hopper GPU or an older driver.
_ABSENT = frozenset({"NotSupported", "FunctionNotFound"})
# How far the previous sample may sit from the interval's start and still open it (seconds).
_ALIGNMENT_S = 0.25


@dataclass
class _Device:
    previous: Any  # nvmlGpmSample_t holding the sample taken at `previous_t`
    current: Any
    request: Any  # its nvmlGpmMetricsGet_t, the metric ids set once
    previous_t: float | None = None


class GpmSampler:
    """The GPM samples of every device of one node, and the metrics between two reads."""

    def __init__(self, call: GuardedCall) -> None:
        self._call = call
        self._supported: dict[str, bool] = {}  # by parent GPU UUID
        self._devices: dict[str, _Device] = {}  # by device UUID (GPU or MIG instance)

    def supported(self, parent: Any, parent_uuid: str) -> bool:
        """Whether the GPU answers GPM (asked once per GPU)."""
        known = self._supported.get(parent_uuid)
        if known is None:
            support, error = self._call("nvmlGpmQueryDeviceSupport", parent, expected=_ABSENT)
            known = error is None and bool(support.isSupportedDevice)
            self._supported[parent_uuid] = known
        return known

    def read(
        self,
        parent: Any,
        parent_uuid: str,
        uuid: str,
        instance_id: int | None,
        start: float,
        end: float,
    ) -> dict[str, float | None]:
        """The metrics over `[start, end)` for GpuSample's fields; empty when there are none.

        `parent` is the GPU's handle; `instance_id` a MIG instance's GPU instance id, or None
        for the whole GPU. The first read of a device only takes its first sample.
        """
        if not self.supported(parent, parent_uuid):
            return {}
        device = self._devices.get(uuid)
        if device is None:
            device = self._new_device()
            if device is None:
                return {}
            self._devices[uuid] = device
        if instance_id is None:
            _, error = self._call("nvmlGpmSampleGet", parent, device.current)
        else:
            _, error = self._call("nvmlGpmMigSampleGet", parent, instance_id, device.current)
        if error is not None:
            device.previous_t = None  # the next interval has no start to measure from
            return {}
        opened = device.previous_t is not None and abs(device.previous_t - start) <= _ALIGNMENT_S
        figures = self._metrics(device) if opened else {}
        device.previous, device.current = device.current, device.previous
        device.previous_t = end
        return figures

    def _new_device(self) -> _Device | None:
        """Two sample buffers and a metrics request, or None (nothing left allocated)."""
        first, error = self._call("nvmlGpmSampleAlloc")
        if error is not None:
            return None
        second, error = self._call("nvmlGpmSampleAlloc")
        if error is not None:
            self._call("nvmlGpmSampleFree", first)
            return None
        request = pynvml.c_nvmlGpmMetricsGet_t()
        request.version = pynvml.NVML_GPM_METRICS_GET_VERSION
        request.numMetrics = len(METRICS)
        for i, (metric_id, _) in enumerate(METRICS):
            request.metrics[i].metricId = metric_id
        return _Device(previous=first, current=second, request=request)

    def _metrics(self, device: _Device) -> dict[str, float | None]:
        request = device.request
        request.sample1 = device.previous
        request.sample2 = device.current
        answer, error = self._call("nvmlGpmMetricsGet", request)
        if error is not None:
            return {}
        figures: dict[str, float | None] = {}
        for i, (_, name) in enumerate(METRICS):
            metric = answer.metrics[i]
            ok = metric.nvmlReturn == pynvml.NVML_SUCCESS
            # 0.01 % steps: finer than the counters are worth, and the same figure whichever
            # way a driver sums them.
            figures[name] = round(min(1.0, max(0.0, metric.value / 100.0)), 4) if ok else None
        return figures

    def forget(self, keep: Iterable[str]) -> None:
        """Free the samples of devices that are gone (MIG instances destroyed, GPUs lost)."""
        kept = set(keep)
        for uuid in [u for u in self._devices if u not in kept]:
            self._free(self._devices.pop(uuid))

    def close(self) -> None:
        for device in self._devices.values():
            self._free(device)
        self._devices.clear()

    def _free(self, device: _Device) -> None:
        for sample in (device.previous, device.current):
            self._call("nvmlGpmSampleFree", sample)
