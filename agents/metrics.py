"""The agent's Prometheus `/metrics`: dcgm-exporter's GPU metrics, per-process series, counters.

GPU series carry dcgm-exporter's names (from the catalogue `agents/metrics.csv`) and its
labels (`gpu`, `UUID`, `device`, `modelName`, `Hostname`, `GPU_I_PROFILE`, `GPU_I_ID`, `pod`,
`namespace`, `container`), so dashboards made for dcgm-exporter work. As there, a MIG instance
is labelled with its parent GPU's UUID and its profile and GPU instance id. What dcgm-exporter
cannot give on a shared GPU comes as `gpuledger_process_*` series: one per process, with the
job, team and project the agent found. The agent's own counters say what it sent, spooled,
dropped, and which NVML calls failed.

Values are computed when Prometheus scrapes, from the last samples read: a scrape costs the
sampling loop nothing.
"""

from __future__ import annotations

import csv
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, ProcessCollector, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from gpuledger.agents.nvml import DeviceInfo, ReadStats
from gpuledger.schema.messages import JOB_TAGS, GpuSample, ProcessSample

CATALOGUE = Path(__file__).with_name("metrics.csv")

GPU_LABELS = (
    "gpu",
    "UUID",
    "device",
    "modelName",
    "Hostname",
    "GPU_I_PROFILE",
    "GPU_I_ID",
    "pod",
    "namespace",
    "container",
)
PROCESS_LABELS = (
    *GPU_LABELS,
    "pid",
    "process",
    "container_id",
    "pod_uid",
    "job_id",
    *JOB_TAGS,
)

Conversion = Literal["percent", "mib", "same"]
_CONVERSIONS: dict[str, Callable[[float], float]] = {
    "percent": lambda fraction: round(fraction * 100.0, 2),
    "mib": lambda n: float(int(n) >> 20),
    "same": float,
}


class CatalogueError(ValueError):
    pass


@dataclass(frozen=True)
class MetricSpec:
    name: str
    help: str
    scope: Literal["gpu", "process"]
    field: str
    conversion: Conversion


@dataclass(frozen=True)
class PodInfo:
    """A pod's names as the kubelet knows them (see `agents/kubelet.py`)."""

    name: str
    namespace: str
    container: str = ""


# (pod uid, container id) -> the pod's names, or None when unknown
PodLookup = Callable[[str, str | None], PodInfo | None]

_GPU_FIELDS = set(GpuSample.model_fields) | {"mem_free_bytes"}
_PROCESS_FIELDS = set(ProcessSample.model_fields)


def load_catalogue(path: Path = CATALOGUE) -> list[MetricSpec]:
    """The metric catalogue, checked: every problem names the line and the field."""
    specs: list[MetricSpec] = []
    numbered = [
        (i + 1, line)
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines())
        if line.strip() and not line.lstrip().startswith("#")
    ]
    rows = csv.reader((line for _, line in numbered), skipinitialspace=True)
    for (number, _), row in zip(numbered, rows, strict=True):
        where = f"{path.name} line {number}"
        if len(row) != 6:
            raise CatalogueError(
                f"{where}: expected 6 fields (name, type, help, scope, field, conversion), "
                f"got {len(row)}"
            )
        name, kind, help_text, scope, field, conversion = (c.strip() for c in row)
        if kind != "gauge":
            raise CatalogueError(f"{where}: type must be gauge, got {kind!r}")
        if scope not in ("gpu", "process"):
            raise CatalogueError(f"{where}: scope must be gpu or process, got {scope!r}")
        known = _GPU_FIELDS if scope == "gpu" else _PROCESS_FIELDS
        if field not in known:
            raise CatalogueError(
                f"{where}: {scope} field must be one of {sorted(known)}, got {field!r}"
            )
        if conversion not in _CONVERSIONS:
            raise CatalogueError(
                f"{where}: conversion must be one of {sorted(_CONVERSIONS)}, got {conversion!r}"
            )
        specs.append(MetricSpec(name, help_text, scope, field, conversion))  # type: ignore[arg-type]
    return specs


def _gpu_value(sample: GpuSample, field: str) -> Any:
    if field == "mem_free_bytes":
        return max(0, sample.mem_total_bytes - sample.mem_used_bytes)
    return getattr(sample, field)


@dataclass
class _NodeView:
    samples: Sequence[GpuSample]
    devices: dict[str, DeviceInfo]


class AgentMetrics(Collector):
    """The agent's collector; `observe` after every read, Prometheus scrapes `collect`."""

    def __init__(
        self,
        *,
        catalogue: Sequence[MetricSpec] | None = None,
        pods: PodLookup | None = None,
        counters: Callable[[], dict[str, float]] | None = None,
    ) -> None:
        self.catalogue = list(catalogue) if catalogue is not None else load_catalogue()
        self.pods = pods
        self.counters = counters  # spool and sender counters, read at scrape time
        self._lock = threading.Lock()
        self._nodes: dict[str, _NodeView] = {}
        self.reads = 0
        self.samples_read = 0
        self.nvml_errors: dict[tuple[str, str], int] = {}

    def observe(
        self,
        node: str,
        samples: Sequence[GpuSample],
        devices: dict[str, DeviceInfo],
        stats: ReadStats,
    ) -> None:
        with self._lock:
            self._nodes[node] = _NodeView(samples, devices)
            self.reads += 1
            self.samples_read += len(samples)
            for call, count in stats.errors_by_call.items():
                function, _, error = call.partition(":")
                key = (function, error)
                self.nvml_errors[key] = self.nvml_errors.get(key, 0) + count

    # -- what a scrape sees

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            nodes = dict(self._nodes)
            reads, samples_read = self.reads, self.samples_read
            nvml_errors = dict(self.nvml_errors)
        families = {
            spec.name: GaugeMetricFamily(
                spec.name,
                spec.help,
                labels=GPU_LABELS if spec.scope == "gpu" else PROCESS_LABELS,
            )
            for spec in self.catalogue
        }
        for node, view in nodes.items():
            for sample in view.samples:
                gpu_labels = self._gpu_labels(node, sample, view.devices)
                for spec in self.catalogue:
                    convert = _CONVERSIONS[spec.conversion]
                    family = families[spec.name]
                    if spec.scope == "gpu":
                        value = _gpu_value(sample, spec.field)
                        if value is not None:
                            family.add_metric(gpu_labels, convert(value))
                        continue
                    for process in sample.processes:
                        value = getattr(process, spec.field)
                        if value is not None:
                            family.add_metric(
                                self._process_labels(gpu_labels, process), convert(value)
                            )
        yield from families.values()
        yield from self._agent_metrics(reads, samples_read, nvml_errors)

    def _pod(self, process: ProcessSample) -> PodInfo | None:
        if self.pods is None or process.pod_uid is None:
            return None
        return self.pods(process.pod_uid, process.container_id)

    def _gpu_labels(
        self, node: str, sample: GpuSample, devices: dict[str, DeviceInfo]
    ) -> list[str]:
        device = devices.get(sample.gpu_uuid)
        parent = device.parent_uuid if device is not None else sample.gpu_uuid
        instance = device.gpu_instance_id if device is not None else None
        # dcgm-exporter puts a pod on a GPU when the GPU (or MIG instance) is that pod's.
        pods = {self._pod(p) for p in sample.processes}
        pod = pods.pop() if len(pods) == 1 else None
        return [
            str(sample.gpu_index),
            parent,
            f"nvidia{sample.gpu_index}",
            sample.gpu_name,
            node,
            sample.mig_profile or "",
            "" if sample.mig_profile is None or instance is None else str(instance),
            pod.name if pod else "",
            pod.namespace if pod else "",
            pod.container if pod else "",
        ]

    def _process_labels(self, gpu_labels: list[str], process: ProcessSample) -> list[str]:
        pod = self._pod(process)
        labels = process.labels
        return [
            *gpu_labels[:7],
            pod.name if pod else "",
            pod.namespace if pod else "",
            pod.container if pod else "",
            str(process.pid),
            process.name,
            process.container_id or "",
            process.pod_uid or "",
            labels.job_id or "",
            labels.team or "",
            labels.project or "",
            labels.job_type.value if labels.job_type else "",
            labels.experiment_id or "",
            labels.model or "",
            labels.environment or "",
        ]

    def _agent_metrics(
        self, reads: int, samples_read: int, nvml_errors: dict[tuple[str, str], int]
    ) -> Iterator[Metric]:
        yield CounterMetricFamily(
            "gpuledger_agent_reads", "NVML reads (one per interval and node).", value=reads
        )
        yield CounterMetricFamily(
            "gpuledger_agent_samples_read", "GPU samples read from NVML.", value=samples_read
        )
        errors = CounterMetricFamily(
            "gpuledger_agent_nvml_errors",
            "NVML calls that gave no value, by function and error (NotSupported, GpuIsLost, ...).",
            labels=("function", "error"),
        )
        for (function, error), count in sorted(nvml_errors.items()):
            errors.add_metric([function, error], count)
        yield errors
        values = self.counters() if self.counters is not None else {}
        for name, help_text in _SPOOL_COUNTERS:
            if name in values:
                yield CounterMetricFamily(name, help_text, value=values[name])
        for name, help_text in _SPOOL_GAUGES:
            if name in values:
                yield GaugeMetricFamily(name, help_text, value=values[name])


_SPOOL_COUNTERS = (
    ("gpuledger_agent_samples_sent", "GPU samples Kafka acknowledged."),
    ("gpuledger_agent_samples_spooled", "GPU samples that waited on disk: Kafka was slow or down."),
    ("gpuledger_agent_samples_dropped", "GPU samples dropped because the spool was full."),
    ("gpuledger_agent_messages_sent", "Kafka messages acknowledged."),
    ("gpuledger_agent_send_failures", "Kafka sends that failed and will be retried."),
)
_SPOOL_GAUGES = (
    ("gpuledger_agent_spool_backlog_samples", "GPU samples waiting in the spool now."),
    ("gpuledger_agent_spool_backlog_bytes", "Bytes waiting in the spool now."),
    ("gpuledger_agent_kafka_connected", "1 when Kafka takes records, 0 during an outage."),
    ("gpuledger_agent_kafka_wait_seconds", "How long the message in flight has waited for Kafka."),
)


def serve_metrics(
    metrics: AgentMetrics, port: int, addr: str = "0.0.0.0"
) -> tuple[WSGIServer, threading.Thread]:
    """`/metrics` on `addr:port` (port 0: a free one; see the server's `server_port`)."""
    registry = CollectorRegistry()
    registry.register(metrics)
    registry.register(ProcessCollector(registry=None))
    return start_http_server(port, addr, registry)
