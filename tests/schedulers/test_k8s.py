"""Kubernetes: a recorded-format pod watch stream becomes job events, first through the pure
tracker, then through `gpuledger k8s watch` itself, whose kubernetes client reads the stream
from a local stand-in of the API server and publishes to the real broker."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest

from gpuledger.broker import running_broker
from gpuledger.schedulers.k8s import JobEventTracker, LabelNames, gpus_requested, pod_job_event
from gpuledger.schema.messages import JobEvent
from gpuledger.schema.topics import Topics
from tests.support import read_topic, wait_until

FIXTURES = Path(__file__).parent / "fixtures"
WATCH = [json.loads(line) for line in (FIXTURES / "k8s-pod-watch.jsonl").read_text().splitlines()]
NOW = 1_795_650_000.0


def iso(epoch: float | None) -> str | None:
    from datetime import UTC, datetime

    return None if epoch is None else datetime.fromtimestamp(epoch, UTC).isoformat()


def summary(event: JobEvent) -> tuple[Any, ...]:
    return (
        event.job_id,
        event.state,
        event.team,
        event.project,
        event.job_type,
        iso(event.started_at),
        iso(event.ended_at),
    )


EXPECTED = [
    ("train-7", "pending", "vision", "detector", "training", None, None),
    ("train-7", "pending", "vision", "detector", "training", None, None),  # scheduled on a node
    ("train-7", "running", "vision", "detector", "training", "2026-11-25T09:01:30+00:00", None),
    ("train-7", "succeeded", "vision", "detector", "training", "2026-11-25T09:01:30+00:00",
     "2026-11-25T11:31:30+00:00"),
    ("serving/ranker-infer-0", "running", "search", "ranker", "inference",
     "2026-11-25T08:00:05+00:00", None),
    ("serving/ranker-infer-0", "preempted", "search", "ranker", "inference",
     "2026-11-25T08:00:05+00:00", "2026-11-25T10:15:00+00:00"),
    ("nb-ada", "running", "research", "notebooks", "other", "2026-11-25T07:00:10+00:00", None),
    ("nb-ada", "cancelled", "research", "notebooks", "other", "2026-11-25T07:00:10+00:00",
     "2026-11-25T12:00:00+00:00"),
]  # fmt: skip


def test_recorded_watch_stream_becomes_job_events() -> None:
    events = JobEventTracker().replay(WATCH, NOW)
    assert [summary(e) for e in events] == EXPECTED
    assert events[1].labels is not None and events[1].labels["k8s_node"] == "gpu-node-07"
    assert events[1].labels["gpus_requested"] == "2"
    assert events[1].labels["k8s_pod_uid"] == "6f1c2a9e-0b3d-4e5f-8a7b-1c2d3e4f5a60"
    tags = {(e.job_id, e.model, e.environment) for e in events}
    assert tags == {
        ("train-7", None, None),
        ("serving/ranker-infer-0", "ranker-v3", "prod"),
        ("nb-ada", None, None),
    }


def test_pods_without_gpus_and_bookmarks_are_ignored() -> None:
    cpu_pod, bookmark = WATCH[-2], WATCH[-1]
    assert gpus_requested(cpu_pod["object"]) == 0
    assert pod_job_event(cpu_pod["type"], cpu_pod["object"], NOW) is None
    assert pod_job_event(bookmark["type"], bookmark["object"], NOW) is None


def test_label_names_are_configurable() -> None:
    pod = json.loads(json.dumps(WATCH[2]["object"]))
    pod["metadata"]["labels"] = {"acme/run": "run-9", "acme/owner": "vision"}
    names = LabelNames(job_id="acme/run", team="acme/owner")
    event = pod_job_event("MODIFIED", pod, NOW, names)
    assert event is not None and (event.job_id, event.team) == ("run-9", "vision")


# -- `gpuledger k8s watch` against a stand-in API server ------------------------------------
class _KubeApi(BaseHTTPRequestHandler):
    """GET /api/v1/pods?watch=…: the recorded stream once, then empty streams."""

    served: ClassVar[int] = 0
    paths: ClassVar[list[str]] = []

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        type(self).paths.append(self.path)
        if not self.path.startswith("/api/v1/pods?") or "watch=true" not in self.path.lower():
            self.send_response(404)
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Connection", "close")
        self.end_headers()
        if type(self).served == 0:
            for event in WATCH:
                self.wfile.write(json.dumps(event).encode() + b"\n")
                self.wfile.flush()
        type(self).served += 1


@pytest.fixture
def kube_api() -> Iterator[str]:
    _KubeApi.served, _KubeApi.paths = 0, []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _KubeApi)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    host, port = server.server_address[:2]
    yield f"http://{host!s}:{port}"
    server.shutdown()
    server.server_close()


def test_k8s_watch_command_publishes_the_streams_job_events(kube_api: str, tmp_path: Path) -> None:
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "test", "cluster": {"server": kube_api}}],
                "users": [{"name": "watcher", "user": {"token": "t0ken"}}],
                "contexts": [{"name": "test", "context": {"cluster": "test", "user": "watcher"}}],
                "current-context": "test",
            }
        )
    )
    with running_broker(Topics()) as broker:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gpuledger.cli", "--bootstrap", broker.bootstrap,
             "--data-dir", str(tmp_path / "data"), "k8s", "watch", "--kubeconfig",
             str(kubeconfig)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        try:
            records = wait_until(
                lambda: (
                    found
                    if len(found := read_topic(broker.bootstrap, Topics().jobs, 0.5))
                    >= len(EXPECTED)
                    else None
                ),
                timeout_s=30,
                what="the watcher's job events",
            )
        finally:
            proc.send_signal(signal.SIGTERM)
            out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert f"publishing {len(EXPECTED)} job events" in out
    events = [JobEvent.model_validate_json(r.value) for r in records]
    assert [summary(e) for e in events] == EXPECTED
    assert [r.key.decode() for r in records] == [e[0] for e in EXPECTED]
    assert _KubeApi.paths[0].startswith("/api/v1/pods?")
