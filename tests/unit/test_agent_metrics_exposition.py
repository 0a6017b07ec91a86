"""/metrics written by the agent's own renderer: byte for byte what prometheus_client writes."""

from __future__ import annotations

import gzip
import threading
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import make_wsgi_app
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from gpuledger.agents.metrics import (
    AgentMetrics,
    MetricsApp,
    MetricSpec,
    PodInfo,
    load_catalogue,
    serve_metrics,
)
from gpuledger.agents.nvml import DeviceInfo, NvmlReader, ReadStats
from gpuledger.agents.sim.nvml import SimulatedNvml
from gpuledger.schema.messages import GpuSample, ProcessLabels, ProcessSample
from tests.unit.test_agent_metrics import T0, fleet

# What Prometheus servers and people send; each is served by the agent's renderer.
ACCEPTS = [
    None,
    "text/plain; version=0.0.4",
    "text/plain;version=1.0.0",
    "text/plain;version=1.0.0;escaping=allow-utf-8",
    "application/openmetrics-text",
    "application/openmetrics-text;version=1.0.0",
    "application/openmetrics-text;version=1.0.0;escaping=allow-utf-8;q=0.6,"
    "application/openmetrics-text;version=0.0.1;q=0.5,text/plain;version=1.0.0;q=0.4",
    "application/openmetrics-text;version=2.0.0;escaping=underscores",
]
# ... and these go to prometheus_client's own app.
OTHER_REQUESTS: list[dict[str, str]] = [
    {"HTTP_ACCEPT": "application/openmetrics-text;version=1.0.0;escaping=dots"},
    {"HTTP_ACCEPT": "text/plain;version=1.0.0;escaping=values"},
    {"QUERY_STRING": "name[]=DCGM_FI_DEV_FB_USED"},
    {"REQUEST_METHOD": "OPTIONS"},
    {"REQUEST_METHOD": "POST"},
    {"PATH_INFO": "/favicon.ico"},
]


class Fixed(Collector):
    """Stands for the process collector, whose values move between two scrapes."""

    def collect(self) -> Iterator[Metric]:
        yield CounterMetricFamily("process_cpu_seconds", "CPU.", value=1.5)


def call(app: Callable[..., list[bytes]], **environ: str) -> tuple[str, list[Any], bytes]:
    got: list[Any] = []
    env = {"REQUEST_METHOD": "GET", "PATH_INFO": "/metrics", "QUERY_STRING": "", **environ}
    body = b"".join(app(env, lambda status, headers: got.extend([status, headers])))
    return got[0], got[1], body


def assert_same_as_prometheus_client(metrics: AgentMetrics) -> None:
    registry = CollectorRegistry()
    registry.register(metrics)
    registry.register(Fixed())
    theirs, ours = make_wsgi_app(registry), MetricsApp(metrics, [Fixed()])
    for accept in ACCEPTS:
        for encoding in (None, "gzip"):
            environ = {"HTTP_ACCEPT": accept} if accept is not None else {}
            if encoding:
                environ["HTTP_ACCEPT_ENCODING"] = encoding
            expected, got = call(theirs, **environ), call(ours, **environ)
            if encoding:
                expected = (*expected[:2], gzip.decompress(expected[2]))
                got = (*got[:2], gzip.decompress(got[2]))
            assert got == expected, (accept, encoding)
    for environ in OTHER_REQUESTS:
        assert call(ours, **environ) == call(theirs, **environ)


def fleet_metrics(pods: Callable[[str, str | None], PodInfo | None] | None) -> AgentMetrics:
    scenario = fleet()  # the node of the scrape tests: shared GPUs, MIG, pods
    sim = SimulatedNvml(scenario, "gpu-node-7", lambda: T0 + 60)
    reader = NvmlReader(sim, "gpu-node-7", lambda: T0 + 60, attribute=sim.attribute)
    reader.init()
    metrics = AgentMetrics(pods=pods, counters=lambda: {"gpuledger_agent_samples_sent": 4.0})
    for t in (T0 + 59, T0 + 60):
        samples, stats = reader.read(t)
        metrics.observe("gpu-node-7", samples, reader.devices, stats)
    return metrics


def test_a_simulated_node_scrapes_the_same_with_and_without_pods() -> None:
    assert_same_as_prometheus_client(fleet_metrics(None))
    assert_same_as_prometheus_client(
        fleet_metrics(lambda uid, _container: PodInfo(f'pod "{uid[:6]}"\\', "ml\nx", "main"))
    )
    assert_same_as_prometheus_client(AgentMetrics())  # nothing read yet


def test_help_texts_are_escaped_as_each_format_escapes_them() -> None:
    metrics = fleet_metrics(None)
    metrics.catalogue = [
        MetricSpec(spec.name, f'{spec.help} "quoted" back\\slash\nnext', spec.scope, spec.field,
                   spec.conversion)
        for spec in load_catalogue()
    ]  # fmt: skip
    assert_same_as_prometheus_client(metrics)


# Label values with what the exposition escapes (backslash, newline, double quote) and more.
texts = st.text(max_size=12) | st.sampled_from(['a"b', "c\\d", "e\nf", "\\n", "é😀", ""])
values = st.floats(allow_nan=False, allow_infinity=False, min_value=0.0) | st.sampled_from(
    [0.0, 1.0, 123456789.0, 1e22, 5e-324]
)


@st.composite
def samples(draw: st.DrawFn) -> list[GpuSample]:
    out = []
    for index in range(draw(st.integers(0, 3))):
        processes = [
            ProcessSample(
                pid=draw(st.integers(0, 2**32 - 1)),
                name=draw(texts),
                util_sm=draw(st.none() | st.floats(0.0, 1.0)),
                mem_used_bytes=draw(st.integers(0, 2**64 - 1)),
                container_id=draw(st.none() | texts),
                pod_uid=draw(st.none() | texts),
                labels=ProcessLabels(job_id=draw(st.none() | texts), team=draw(texts)),
            )
            for _ in range(draw(st.integers(0, 3)))
        ]
        out.append(
            GpuSample(
                ts=T0,
                node="n",
                gpu_uuid=f"GPU-{index}",
                gpu_index=index,
                gpu_name=draw(texts),
                mig_profile=draw(st.none() | st.just("1g.10gb")),
                util_sm=draw(st.none() | st.floats(0.0, 1.0)),
                mem_used_bytes=draw(st.integers(0, 2**64 - 1)),
                mem_total_bytes=draw(st.integers(0, 2**64 - 1)),
                power_w=draw(st.none() | values),
                temp_c=draw(st.none() | st.floats(-300.0, 1e9)),
                processes=processes,
            )
        )
    return out


@settings(max_examples=150, deadline=None)
@given(samples(), samples(), texts)
def test_any_labels_and_values_scrape_the_same_scrape_after_scrape(
    first: list[GpuSample], second: list[GpuSample], pod: str
) -> None:
    def pods(uid: str, _container: str | None) -> PodInfo | None:
        return PodInfo(pod + uid, uid, pod) if uid else None

    metrics = AgentMetrics(pods=pods)
    devices = {"GPU-1": DeviceInfo(index=0, parent_uuid="GPU-0", gpu_instance_id=3)}
    for read in (first, second, first):  # label sets come, go and come back
        metrics.observe('node "7"\\', read, devices, ReadStats())
        assert_same_as_prometheus_client(metrics)


def test_the_server_answers_scrapes_and_stops_at_once() -> None:
    metrics = fleet_metrics(None)
    server, thread = serve_metrics(metrics, 0, "127.0.0.1")
    try:
        url = f"http://127.0.0.1:{server.server_port}/metrics"
        for _ in range(3):
            with urllib.request.urlopen(url, timeout=5) as response:
                text = response.read().decode()
            assert "DCGM_FI_DEV_FB_USED{" in text and "process_resident_memory_bytes" in text
    finally:
        stopped = threading.Event()

        def stop() -> None:
            server.shutdown()
            stopped.set()

        threading.Thread(target=stop, daemon=True).start()
        assert stopped.wait(2.0)  # not the server's long poll
        server.server_close()
    thread.join(1.0)
    assert not thread.is_alive()
