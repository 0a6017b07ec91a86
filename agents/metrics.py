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

import contextlib
import csv
import gzip
import re
import socket
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from operator import attrgetter
from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qs
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, ProcessCollector, make_wsgi_app
from prometheus_client import generate_latest as text_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import ThreadingWSGIServer, choose_encoder, gzip_accepted
from prometheus_client.openmetrics import exposition as openmetrics
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

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
# One series of a metric: its label values (in GPU_LABELS or PROCESS_LABELS order), its value.
Series = tuple[tuple[str, ...], float]

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


def _free_bytes(sample: GpuSample) -> int:
    return max(0, sample.mem_total_bytes - sample.mem_used_bytes)


def _gpu_field(field: str) -> Callable[[GpuSample], Any]:
    """How to read a catalogue field from a sample."""
    return _free_bytes if field == "mem_free_bytes" else attrgetter(field)


def _label_text(names: Sequence[str]) -> Callable[[Sequence[str]], str]:
    """`{name="value",...}` for label values in `names`' order, as prometheus_client writes
    a sample's labels: sorted by name, values escaped (backslash, newline, double quote)."""
    if len(set(names)) != len(names):
        raise ValueError(f"repeated label names: {names}")
    order = sorted(range(len(names)), key=names.__getitem__)

    def render(values: Sequence[str]) -> str:
        pairs = []
        for i in order:
            value = values[i].replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")
            pairs.append(f'{names[i]}="{value}"')
        return "{" + ",".join(pairs) + "}"

    return render


_GPU_LABEL_TEXT = _label_text(GPU_LABELS)
_PROCESS_LABEL_TEXT = _label_text(PROCESS_LABELS)


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
        self._render_lock = threading.Lock()
        self._label_text: dict[tuple[str, ...], str] = {}  # label set -> `{name="value",...}`

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
        for spec, series in zip(self.catalogue, self._series(), strict=True):
            family = GaugeMetricFamily(
                spec.name, spec.help, labels=GPU_LABELS if spec.scope == "gpu" else PROCESS_LABELS
            )
            for labels, value in series:
                family.add_metric(labels, value)
            yield family
        yield from self.collect_counters()

    def collect_counters(self) -> Iterator[Metric]:
        """What `collect` yields after the catalogue's families: the agent's own counters."""
        with self._lock:
            counters = self.reads, self.samples_read, dict(self.nvml_errors)
        yield from self._agent_metrics(*counters)

    def render_catalogue(self, openmetrics_format: bool = False) -> str:
        """The catalogue's families as Prometheus' text format (or OpenMetrics') writes them:
        the same bytes as prometheus_client's exposition of the families `collect` yields
        first, without its per-label checks and escaping on every scrape (hundreds of series
        of two dozen labels): each series' label set is escaped once and kept while it lasts.
        """
        rows = self._series()
        out: list[str] = []
        with self._render_lock:
            cache = self._label_text
            fresh: dict[tuple[str, ...], str] = {}
            for spec, series in zip(self.catalogue, rows, strict=True):
                help_text = spec.help.replace("\\", r"\\").replace("\n", r"\n")
                if openmetrics_format:
                    help_text = help_text.replace('"', r"\"")
                out.append(f"# HELP {spec.name} {help_text}\n# TYPE {spec.name} gauge\n")
                render = _GPU_LABEL_TEXT if spec.scope == "gpu" else _PROCESS_LABEL_TEXT
                for labels, value in series:
                    text = fresh.get(labels)
                    if text is None:
                        text = cache.get(labels) or render(labels)
                        fresh[labels] = text
                    out.append(f"{spec.name}{text} {floatToGoString(value)}\n")
            self._label_text = fresh  # series gone since the last scrape are forgotten
        return "".join(out)

    def _series(self) -> list[list[Series]]:
        """Each catalogue metric's series, in catalogue order."""
        with self._lock:
            nodes = dict(self._nodes)
        gpu_specs = [
            (i, _gpu_field(spec.field), _CONVERSIONS[spec.conversion])
            for i, spec in enumerate(self.catalogue)
            if spec.scope == "gpu"
        ]
        process_specs = [
            (i, spec.field, _CONVERSIONS[spec.conversion])
            for i, spec in enumerate(self.catalogue)
            if spec.scope == "process"
        ]
        rows: list[list[Series]] = [[] for _ in self.catalogue]
        for node, view in nodes.items():
            for sample in view.samples:
                gpu_labels = self._gpu_labels(node, sample, view.devices)
                for i, read, convert in gpu_specs:
                    value = read(sample)
                    if value is not None:
                        rows[i].append((gpu_labels, convert(value)))
                if not process_specs:
                    continue
                for process in sample.processes:
                    labels: tuple[str, ...] | None = None
                    for i, field, convert in process_specs:
                        value = getattr(process, field)
                        if value is not None:
                            if labels is None:
                                labels = self._process_labels(gpu_labels, process)
                            rows[i].append((labels, convert(value)))
        return rows

    def _pod(self, process: ProcessSample) -> PodInfo | None:
        if self.pods is None or process.pod_uid is None:
            return None
        return self.pods(process.pod_uid, process.container_id)

    def _gpu_labels(
        self, node: str, sample: GpuSample, devices: dict[str, DeviceInfo]
    ) -> tuple[str, ...]:
        device = devices.get(sample.gpu_uuid)
        parent = device.parent_uuid if device is not None else sample.gpu_uuid
        instance = device.gpu_instance_id if device is not None else None
        # dcgm-exporter puts a pod on a GPU when the GPU (or MIG instance) is that pod's.
        pods = {self._pod(p) for p in sample.processes}
        pod = pods.pop() if len(pods) == 1 else None
        return (
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
        )

    def _process_labels(
        self, gpu_labels: tuple[str, ...], process: ProcessSample
    ) -> tuple[str, ...]:
        pod = self._pod(process)
        labels = process.labels
        return (
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
        )

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


# Escapings under which prometheus_client writes the catalogue's names unchanged (they are
# legacy Prometheus names, checked below): `render_catalogue` writes the same bytes.
_PLAIN_ESCAPINGS = frozenset({openmetrics.UNDERSCORES, openmetrics.ALLOWUTF8})
_LEGACY_METRIC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LEGACY_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")


def _legacy_names(catalogue: Iterable[MetricSpec]) -> bool:
    return all(_LEGACY_METRIC_NAME.fullmatch(spec.name) for spec in catalogue) and all(
        _LEGACY_LABEL_NAME.fullmatch(name) and not name.startswith("__") for name in PROCESS_LABELS
    )


class _Rest(Collector):
    """Every family of the registry after the catalogue's, in the registry's order."""

    def __init__(self, metrics: AgentMetrics, others: Sequence[Collector]) -> None:
        self.metrics = metrics
        self.others = others

    def collect(self) -> Iterator[Metric]:
        yield from self.metrics.collect_counters()
        for collector in self.others:
            yield from collector.collect()


class MetricsApp:
    """`/metrics` as prometheus_client's WSGI app serves `metrics` and `others`, with the
    catalogue's families written by `AgentMetrics.render_catalogue` in the usual cases (a GET
    of the text or OpenMetrics format, names unescaped); any other request goes to
    prometheus_client's app itself."""

    def __init__(self, metrics: AgentMetrics, others: Sequence[Collector] = ()) -> None:
        registry = CollectorRegistry()
        registry.register(metrics)
        for collector in others:
            registry.register(collector)
        self.metrics = metrics
        self.fallback = make_wsgi_app(registry)
        self.rest = _Rest(metrics, others)
        self.fast = _legacy_names(metrics.catalogue)

    def _format(self, encoder: Callable[..., bytes]) -> bool | None:
        """True for OpenMetrics, False for the text format, None when not served here."""
        if not self.fast:
            return None
        if encoder is text_latest:
            return False
        if not isinstance(encoder, partial):
            return None
        if encoder.keywords.get("escaping", openmetrics.UNDERSCORES) not in _PLAIN_ESCAPINGS:
            return None
        if encoder.func is text_latest:
            return False
        if encoder.func is openmetrics.generate_latest:
            return True
        return None

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        if (
            environ.get("REQUEST_METHOD") != "GET"
            or environ.get("PATH_INFO") == "/favicon.ico"
            or "name[]" in parse_qs(environ.get("QUERY_STRING", ""))
        ):
            return self.fallback(environ, start_response)
        encoder, content_type = choose_encoder(environ.get("HTTP_ACCEPT", ""))
        om = self._format(encoder)
        if om is None:
            return self.fallback(environ, start_response)
        output = self.metrics.render_catalogue(om).encode() + encoder(self.rest)
        headers = [("Content-Type", content_type)]
        if gzip_accepted(environ.get("HTTP_ACCEPT_ENCODING", "")):
            output = gzip.compress(output)
            headers.append(("Content-Encoding", "gzip"))
        start_response("200 OK", headers)
        return [output]


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes are not logged."""


class MetricsServer(ThreadingWSGIServer):
    """prometheus_client's threaded WSGI server, without its twice-a-second poll: it sleeps
    until a scrape comes, and `shutdown` wakes it with a connection of its own."""

    POLL_S = 600.0

    def serve(self) -> threading.Thread:
        thread = threading.Thread(
            target=self.serve_forever, args=(self.POLL_S,), name="metrics-server", daemon=True
        )
        thread.start()
        return thread

    def shutdown(self) -> None:
        stopping = threading.Thread(target=super().shutdown, daemon=True)
        stopping.start()  # sets the server's stop flag, then waits for serve_forever to see it
        for _ in range(50):
            self._wake()
            stopping.join(0.1)
            if not stopping.is_alive():
                return

    def _wake(self) -> None:
        host, port = self.server_address[:2]
        if host in ("0.0.0.0", ""):
            host = "127.0.0.1"
        elif host == "::":
            host = "::1"
        with contextlib.suppress(OSError):  # serve_forever still stops within POLL_S
            socket.create_connection((str(host), int(port)), timeout=1).close()


def serve_metrics(
    metrics: AgentMetrics, port: int, addr: str = "0.0.0.0"
) -> tuple[WSGIServer, threading.Thread]:
    """`/metrics` on `addr:port` (port 0: a free one; see the server's `server_port`)."""
    family, _, _, _, sockaddr = socket.getaddrinfo(
        addr, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]

    class Server(MetricsServer):
        address_family = family

    app = MetricsApp(metrics, [ProcessCollector(registry=None)])
    server = make_server(str(sockaddr[0]), port, app, Server, handler_class=_QuietHandler)
    return server, server.serve()
