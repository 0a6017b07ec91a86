"""The guard against the real store: idle alerts in, steps decided, carried out through Slurm
stand-ins, a webhook and a Kubernetes API that checks each request, recorded, and remembered
across a restart."""

from __future__ import annotations

import json
import os
import stat
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from clickhouse_connect.driver.client import Client

from gpuledger.broker import free_port
from gpuledger.guard.actuators import (
    Actuators,
    AlertmanagerNotices,
    ExecHook,
    Kubernetes,
    Slurm,
    Webhook,
)
from gpuledger.guard.service import Guard
from gpuledger.ledger.guard import Action, Episode, parse_policies
from gpuledger.schema.migrate import migrate
from tests.alerts.peers import Alertmanager
from tests.support import run_gpuledger

pytestmark = pytest.mark.integration

NOW = time.time()
HOUR = 3600.0
USD_PER_HOUR = 4.0

POLICIES = """
[[policy]]
name = "requeue-idle-training"
idle_minutes = 60
enforce = true
horizon_hours = 2
webhook_url = "{hook}"
match = {{ job_type = "training", scheduler = "slurm" }}
steps = [
  {{ kind = "notify", after_minutes = 0 }},
  {{ kind = "act", after_minutes = 30, action = "requeue" }},
]

[[policy]]
name = "notebooks-dry-run"
idle_minutes = 30
match = {{ job_type = "notebook", scheduler = "kubernetes" }}
steps = [{{ kind = "act", after_minutes = 0, action = "scale_to_zero" }}]
"""


@dataclass
class Recorder:
    """A webhook receiver that keeps what it was sent."""

    posts: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    url: str = ""


@pytest.fixture
def hook() -> Iterator[Recorder]:
    recorder = Recorder()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            recorder.posts.append((self.headers["Idempotency-Key"], body))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    recorder.url = f"http://127.0.0.1:{server.server_port}/hook"
    yield recorder
    server.shutdown()


@pytest.fixture
def slurm(tmp_path: Path) -> tuple[Slurm, Path]:
    """scontrol and scancel stand-ins that append their arguments to a log."""
    log = tmp_path / "slurm.log"
    for tool in ("scontrol", "scancel"):
        script = tmp_path / tool
        script.write_text(f'#!/bin/sh\necho "{tool} $*" >> {log}\n')
        script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return Slurm(scontrol=str(tmp_path / "scontrol"), scancel=str(tmp_path / "scancel")), log


def insert(client: Client, table: str, row: dict[str, Any]) -> None:
    client.insert(f"gpuledger.{table}", [list(row.values())], column_names=list(row))


def seed(
    client: Client, job: str, gpu: str, job_type: str, labels: dict[str, str], idle_h: float
) -> None:
    """A firing idle alert for (gpu, job), the job's record and its newest fact."""
    now_ms, since_ms = round(NOW * 1000), round((NOW - idle_h * HOUR) * 1000)
    who = {"job_id": job, "team": "ml", "project": "p"}
    alert = {"ts": now_ms, "kind": "idle_allocated_gpu", "state": "firing", "gpu_uuid": gpu}
    alert |= {"node": "n1", **who, "since": since_ms, "idle_seconds": idle_h * HOUR}
    insert(client, "alerts", alert | {"wasted_usd": idle_h * USD_PER_HOUR, "message": "idle"})
    job_row = {**who, "state": "running", "job_type": job_type, "gpu_uuids": [gpu]}
    insert(client, "jobs", job_row | {"labels": labels, "updated_at": now_ms})
    fact = {"ts": now_ms - 60_000, "sign": 1, "node": "n1", "gpu_uuid": gpu, "gpu_model": "H100"}
    fact |= {**who, "job_type": job_type, "duration_s": 1.0, "share": 1.0, "allocated": 1}
    insert(client, "cost_facts", fact | {"usd_per_gpu_hour": USD_PER_HOUR, "cost_usd": 0.001})


@pytest.fixture
def db(ch: Client) -> Client:
    migrate(ch)
    return ch


def trail(client: Client) -> Sequence[Sequence[Any]]:
    return client.query(
        "SELECT policy, target, step, kind, action, dry_run, outcome, round(usd_at_stake, 2) "
        "FROM gpuledger.guard_actions ORDER BY policy, step"
    ).result_rows


def test_an_enforced_policy_notifies_then_requeues_once_across_restarts(
    db: Client, hook: Recorder, slurm: tuple[Slurm, Path]
) -> None:
    seed(db, "4711", "GPU-a", "training", {"slurm_user": "ada"}, idle_h=2)
    seed(db, "nb-1", "GPU-b", "notebook", {"k8s_pod": "nb-1-0", "k8s_namespace": "ml"}, idle_h=1)
    policies = parse_policies(POLICIES.format(hook=hook.url))
    actuators = Actuators(slurm=slurm[0], webhooks={"requeue-idle-training": Webhook(hook.url)})
    Guard(db, policies, actuators, clock=lambda: NOW).check_once()
    assert trail(db) == [
        # No horizon in the notebooks' policy: a day of the GPU, 24 h x 4 $/h, at stake.
        ("notebooks-dry-run", "nb-1@GPU-b", 0, "act", "scale_to_zero", 1, "dry_run", 96.0),
        ("requeue-idle-training", "4711@GPU-a", 0, "notify", "", 0, "notified", 8.0),
        ("requeue-idle-training", "4711@GPU-a", 1, "act", "requeue", 0, "done", 8.0),
    ]
    assert slurm[1].read_text() == "scontrol requeue 4711\n"
    keys = [key for key, _ in hook.posts]
    assert keys == ["requeue-idle-training/4711@GPU-a/0", "requeue-idle-training/4711@GPU-a/1"]
    assert "was stopped (requeue)" in hook.posts[1][1]["text"]
    # A new guard (a restart) reads its audit trail: nothing is decided twice.
    assert Guard(db, policies, actuators, clock=lambda: NOW + 600).check_once() == []
    assert slurm[1].read_text() == "scontrol requeue 4711\n"
    # What the guard saved, per team and month: the enforced action; the dry run apart.
    saved = db.query(
        "SELECT policy, actions, saved_usd, dry_runs, would_save_usd FROM gpuledger.guard_savings "
        "ORDER BY policy"
    ).result_rows
    assert saved == [
        ("notebooks-dry-run", 0, 0.0, 1, 96.0),
        ("requeue-idle-training", 1, 8.0, 0, 0.0),
    ]


def test_every_step_reaches_alertmanager_with_its_owner_and_dollars(
    db: Client, slurm: tuple[Slurm, Path], tmp_path: Path
) -> None:
    seed(db, "4720", "GPU-f", "training", {"slurm_user": "ada"}, idle_h=2)
    seed(db, "nb-2", "GPU-g", "notebook", {"k8s_pod": "nb-2-0", "k8s_namespace": "ml"}, idle_h=1)
    policies = parse_policies(POLICIES.format(hook="http://127.0.0.1:9/unused"))
    alertmanager = Alertmanager(tmp_path / "alertmanager").start()
    try:
        notices = AlertmanagerNotices(alertmanager.url)
        actuators = Actuators(slurm=slurm[0], alertmanager=notices)
        rows = Guard(db, policies, actuators, clock=lambda: NOW).check_once()
        held = alertmanager.alerts()
    finally:
        alertmanager.stop()
    assert len(rows) == 3
    steps = {(a["labels"]["policy"], a["labels"]["step"], a["labels"]["dry_run"]): a for a in held}
    assert set(steps) == {
        ("requeue-idle-training", "notify", "false"),
        ("requeue-idle-training", "act", "false"),
        ("notebooks-dry-run", "act", "true"),
    }
    act = steps[("requeue-idle-training", "act", "false")]
    assert act["labels"]["alertname"] == "GpuGuardrailStep"
    assert act["labels"]["severity"] == "critical"
    assert (act["labels"]["team"], act["labels"]["job_id"]) == ("ml", "4720")
    assert (act["labels"]["action"], act["labels"]["gpu_uuid"]) == ("requeue", "GPU-f")
    assert act["annotations"]["usd_at_stake"] == "8.00"  # 2 h horizon x 4 $/h
    dry = steps[("notebooks-dry-run", "act", "true")]
    assert dry["annotations"]["usd_at_stake"] == "96.00"
    assert "would be stopped" in dry["annotations"]["summary"]


def test_an_alertmanager_away_never_holds_up_a_step(db: Client, slurm: tuple[Slurm, Path]) -> None:
    seed(db, "4721", "GPU-h", "training", {"slurm_user": "ada"}, idle_h=2)
    policies = parse_policies(POLICIES.format(hook="http://127.0.0.1:9/unused"))
    notices = AlertmanagerNotices(f"http://127.0.0.1:{free_port()}", timeout_s=0.5)
    actuators = Actuators(slurm=slurm[0], alertmanager=notices)
    rows = Guard(db, policies[:1], actuators, clock=lambda: NOW).check_once()
    assert [(r["kind"], r["outcome"]) for r in rows] == [("notify", "recorded"), ("act", "done")]
    assert slurm[1].read_text() == "scontrol requeue 4721\n"


def test_a_budget_condition_waits_for_the_teams_budget_to_fire(
    db: Client, slurm: tuple[Slurm, Path]
) -> None:
    seed(db, "4722", "GPU-i", "training", {"slurm_user": "ada"}, idle_h=2)
    policies = parse_policies(
        POLICIES.format(hook="http://127.0.0.1:9/unused").replace(
            "horizon_hours = 2", 'horizon_hours = 2\nbudget = ["mtd_100"]'
        )
    )[:1]
    guard = Guard(db, policies, Actuators(slurm=slurm[0]), clock=lambda: NOW)
    assert guard.check_once() == []  # no budget of team ml is over
    budget = {"ts": round(NOW * 1000), "kind": "budget_burn", "rule": "mtd_100"}
    budget |= {"state": "firing", "team": "ml", "since": round(NOW * 1000), "message": "over"}
    insert(db, "alerts", budget | {"wasted_usd": 0.0, "idle_seconds": 0.0})
    rows = guard.check_once()
    assert [(r["kind"], r["outcome"]) for r in rows] == [("notify", "recorded"), ("act", "done")]
    assert slurm[1].read_text() == "scontrol requeue 4722\n"


def test_the_kill_switch_turns_every_action_into_a_dry_run(
    db: Client, slurm: tuple[Slurm, Path]
) -> None:
    seed(db, "4712", "GPU-c", "training", {"slurm_partition": "gpu"}, idle_h=2)
    policies = parse_policies(POLICIES.format(hook="http://127.0.0.1:9/unused"))
    guard = Guard(db, policies[:1], Actuators(slurm=slurm[0]), kill_switch=True, clock=lambda: NOW)
    rows = guard.check_once()
    assert [(r["kind"], r["dry_run"], r["outcome"]) for r in rows if r["kind"] == "act"] == [
        ("act", 1, "dry_run")
    ]
    assert not slurm[1].exists()


def test_the_actions_command_lists_the_trail_and_the_dollars(
    store_url: str, db: Client, slurm: tuple[Slurm, Path]
) -> None:
    seed(db, "4713", "GPU-d", "training", {"slurm_user": "ada"}, idle_h=2)
    policies = parse_policies(POLICIES.format(hook="http://127.0.0.1:9/unused"))
    Guard(db, policies[:1], Actuators(slurm=slurm[0]), clock=lambda: NOW).check_once()
    done = run_gpuledger(
        "--store", store_url, "actions", "-f", "json", env={**os.environ, "COLUMNS": "200"}
    )
    assert done.returncode == 0, done.stderr
    steps = json.loads(done.stdout)
    # No webhook given to the guard: the notice is recorded; the act step was carried out.
    assert [(s["kind"], s["outcome"]) for s in steps] == [("notify", "recorded"), ("act", "done")]
    assert "actions saved $8.00" in done.stderr


def test_an_exec_step_runs_the_policys_command_with_the_decision(
    db: Client, tmp_path: Path
) -> None:
    seed(db, "4714", "GPU-e", "training", {"slurm_user": "ada"}, idle_h=2)
    said = tmp_path / "said"
    script = tmp_path / "stop-job"
    script.write_text(
        f'#!/bin/sh\necho "$GPULEDGER_JOB_ID $GPULEDGER_KIND" > {said}\ncat >> {said}\n'
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    policies = parse_policies(
        POLICIES.format(hook="http://127.0.0.1:9/unused")
        .replace('action = "requeue"', 'action = "exec"')
        .replace("horizon_hours = 2", f"horizon_hours = 2\nexec = [{str(script)!r}]")
    )
    hooks = {"requeue-idle-training": ExecHook(policies[0].exec_command)}
    rows = Guard(db, policies[:1], Actuators(exec_hooks=hooks), clock=lambda: NOW).check_once()
    assert [(r["kind"], r["outcome"]) for r in rows] == [("notify", "recorded"), ("act", "done")]
    first, body = said.read_text().split("\n", 1)
    assert first == "4714 act"
    assert json.loads(body)["usd_at_stake"] == 8.0


# --- Kubernetes, against a server that checks each request ------------------------------------

PODS = {
    ("ml", "web-7d9-abc"): {"kind": "ReplicaSet", "name": "web-7d9"},
    ("ml", "db-0"): {"kind": "StatefulSet", "name": "db"},
    ("ml", "train-xyz"): {"kind": "Job", "name": "train"},
    ("ml", "bare"): None,
}
REPLICA_SETS = {("ml", "web-7d9"): {"kind": "Deployment", "name": "web"}}


@dataclass
class FakeKubernetes:
    """Answers the Kubernetes API requests the guard may make; any other request is a 404 and a
    recorded error, so a test sees a wrong path, verb or payload."""

    calls: list[tuple[str, str, Any]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    url: str = ""


def _owner(ref: dict[str, str] | None) -> list[dict[str, Any]]:
    if ref is None:
        return []
    version = "batch/v1" if ref["kind"] == "Job" else "apps/v1"
    return [{**ref, "apiVersion": version, "uid": "u-" + ref["name"], "controller": True}]


@pytest.fixture
def kube() -> Iterator[FakeKubernetes]:
    fake = FakeKubernetes()
    scale_kinds = {"deployments", "statefulsets"}

    class Handler(BaseHTTPRequestHandler):
        def _send(self, code: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _body(self) -> Any:
            length = int(self.headers.get("Content-Length") or 0)
            return json.loads(self.rfile.read(length)) if length else None

        def do_GET(self) -> None:
            parts = self.path.split("?")[0].strip("/").split("/")
            fake.calls.append(("GET", self.path, None))
            if parts[:3] == ["api", "v1", "namespaces"] and parts[4] == "pods":
                key = (parts[3], parts[5])
                if key in PODS:
                    meta = {
                        "name": key[1],
                        "namespace": key[0],
                        "ownerReferences": _owner(PODS[key]),
                    }
                    spec = {"containers": [{"name": "main", "image": "trainer:1"}]}
                    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": spec}
                    return self._send(200, pod)
            if parts[:3] == ["apis", "apps", "v1"] and parts[5] == "replicasets":
                key = (parts[4], parts[6])
                if key in REPLICA_SETS:
                    meta = {
                        "name": key[1],
                        "namespace": key[0],
                        "ownerReferences": _owner(REPLICA_SETS[key]),
                    }
                    selector: dict[str, Any] = {"selector": {"matchLabels": {"app": key[1]}}}
                    rs = {"apiVersion": "apps/v1", "kind": "ReplicaSet", "metadata": meta}
                    return self._send(200, rs | {"spec": selector})
            fake.errors.append(f"GET {self.path}")
            self._send(404, {"kind": "Status", "code": 404})

        def do_PATCH(self) -> None:
            parts = self.path.split("?")[0].strip("/").split("/")
            body = self._body()
            kind = self.headers.get("Content-Type", "")
            fake.calls.append(("PATCH", self.path, body))
            if "merge-patch+json" not in kind:
                fake.errors.append(f"PATCH {self.path} with Content-Type {kind}")
            elif (
                parts[:4] == ["apis", "apps", "v1", "namespaces"]
                and parts[5] in scale_kinds
                and parts[7:] == ["scale"]
            ):
                if body == {"spec": {"replicas": 0}}:
                    return self._send(200, {"kind": "Scale", "spec": {"replicas": 0}})
                fake.errors.append(f"scale body {body}")
            elif parts[:4] == ["apis", "batch", "v1", "namespaces"] and parts[5] == "jobs":
                if body == {"spec": {"suspend": True}}:
                    return self._send(200, {"kind": "Job", "metadata": {"name": parts[6]}})
                fake.errors.append(f"job body {body}")
            else:
                fake.errors.append(f"PATCH {self.path}")
            self._send(404, {"kind": "Status", "code": 404})

        def do_DELETE(self) -> None:
            parts = self.path.split("?")[0].strip("/").split("/")
            fake.calls.append(("DELETE", self.path, self._body()))
            if (
                parts[:3] == ["api", "v1", "namespaces"]
                and parts[4] == "pods"
                and (parts[3], parts[5]) in PODS
            ):
                # The API answers a pod's deletion with the pod, now terminating.
                meta = {
                    "name": parts[5],
                    "namespace": parts[3],
                    "deletionTimestamp": "2026-03-04T10:00:00Z",
                }
                spec = {"containers": [{"name": "main", "image": "trainer:1"}]}
                return self._send(
                    200, {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": spec}
                )
            fake.errors.append(f"DELETE {self.path}")
            self._send(404, {"kind": "Status", "code": 404})

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    fake.url = f"http://127.0.0.1:{server.server_port}"
    yield fake
    server.shutdown()


def kubernetes_for(fake: FakeKubernetes) -> Kubernetes:
    from kubernetes import client

    config = client.Configuration()
    config.host = fake.url
    return Kubernetes(client.ApiClient(config))


def pod_episode(pod: str) -> Episode:
    return Episode("GPU-k", "n1", NOW - HOUR, job_id=pod, team="ml",
                   labels={"k8s_namespace": "ml", "k8s_pod": pod})  # fmt: skip


@pytest.mark.parametrize(
    ("pod", "action", "request_made"),
    [
        (
            "web-7d9-abc",
            Action.scale_to_zero,
            ("PATCH", "/apis/apps/v1/namespaces/ml/deployments/web/scale"),
        ),
        (
            "db-0",
            Action.scale_to_zero,
            ("PATCH", "/apis/apps/v1/namespaces/ml/statefulsets/db/scale"),
        ),
        ("train-xyz", Action.suspend, ("PATCH", "/apis/batch/v1/namespaces/ml/jobs/train")),
        ("bare", Action.delete_pod, ("DELETE", "/api/v1/namespaces/ml/pods/bare")),
    ],
)
def test_kubernetes_actions_reach_the_pods_owner_with_the_api_s_requests(
    kube: FakeKubernetes, pod: str, action: Action, request_made: tuple[str, str]
) -> None:
    outcome = kubernetes_for(kube).act(action, pod_episode(pod))
    assert outcome == "done", kube.errors
    assert not kube.errors
    assert request_made in [(verb, path.split("?")[0]) for verb, path, _ in kube.calls]


def test_an_action_that_does_not_fit_the_owner_is_refused_without_a_change(
    kube: FakeKubernetes,
) -> None:
    outcome = kubernetes_for(kube).act(Action.delete_pod, pod_episode("web-7d9-abc"))
    assert outcome == "failed: the pod belongs to Deployment web; scale_to_zero fits it"
    assert all(verb == "GET" for verb, _, _ in kube.calls)


def test_a_pod_already_gone_counts_as_done(kube: FakeKubernetes) -> None:
    assert kubernetes_for(kube).act(Action.delete_pod, pod_episode("vanished")) == "done"


# -- endpoints that lose money ----------------------------------------------------------------

DAY = datetime(2026, 3, 4, tzinfo=UTC).timestamp()
VALUES_CSV = """endpoint,usd_per_1k_requests,effective_from,note
ep-1,0.5,,launch price
ep-1,1.0,2026-03-04T11:00:00,raised at 11:00
ep-2,5.0,,
"""
LOSING_POLICY = """
[[policy]]
name = "unprofitable-endpoints"
condition = "losing_money"
idle_minutes = 60
match = { scheduler = "kubernetes" }
steps = [
  { kind = "notify", after_minutes = 0 },
  { kind = "act", after_minutes = 0, action = "scale_to_zero" },
]
"""


def seed_endpoint(client: Client, job: str, hours: dict[int, tuple[float, int]]) -> None:
    """An inference job on Kubernetes with, per hour of DAY, (GPU cost, requests)."""
    who = {"job_id": job, "team": "serving", "project": "api"}
    labels = {"k8s_pod": f"{job}-0", "k8s_namespace": "serving"}
    job_row = {**who, "state": "running", "job_type": "inference", "gpu_uuids": [f"GPU-{job}"]}
    insert(client, "jobs", job_row | {"labels": labels, "updated_at": round(DAY * 1000)})
    for hour, (cost, requests) in hours.items():
        at = round((DAY + hour * HOUR + 60) * 1000)
        fact = {"ts": at, "sign": 1, "node": "n1", "gpu_uuid": f"GPU-{job}", "gpu_model": "H100"}
        fact |= {**who, "job_type": "inference", "duration_s": 1.0, "share": 1.0, "allocated": 1}
        insert(client, "cost_facts", fact | {"usd_per_gpu_hour": USD_PER_HOUR, "cost_usd": cost})
        insert(client, "usage", {"ts": at, "job_id": job, "requests": requests, "tokens": 0})


def test_value_load_refuses_a_bad_line_naming_its_field(store_url: str, tmp_path: Path) -> None:
    values = tmp_path / "values.csv"
    values.write_text("endpoint,usd_per_1k_requests\nep-1,0.5\nep-2,-1\n")
    done = run_gpuledger("--store", store_url, "value", "load", str(values))
    assert done.returncode == 2
    assert "values.csv line 3: usd_per_1k_requests must be a finite number" in done.stderr
    assert "got '-1'" in done.stderr


def test_an_endpoint_whose_requests_cost_more_than_they_bring_is_flagged(
    store_url: str, db: Client, tmp_path: Path
) -> None:
    seed_endpoint(db, "ep-1", {10: (2.0, 1000), 11: (2.0, 3000)})
    seed_endpoint(db, "ep-2", {10: (1.0, 1000)})
    seed_endpoint(db, "ep-3", {10: (1.0, 10)})  # no value known: no margin, never acted on
    values = tmp_path / "values.csv"
    values.write_text(VALUES_CSV)
    done = run_gpuledger("--store", store_url, "value", "load", str(values))
    assert done.returncode == 0, done.stderr
    assert "loaded 3 values for 2 endpoints" in done.stdout
    # Loading again changes nothing (the newest load of an endpoint and time wins).
    assert run_gpuledger("--store", store_url, "value", "load", str(values)).returncode == 0

    margins = {
        row[0]: row[1:]
        for row in db.query(
            "SELECT endpoint, requests, round(cost_usd, 6), round(cost_per_1k_requests, 6), "
            "round(value_per_1k_requests, 6), round(value_usd, 6), round(margin_usd, 6) "
            "FROM gpuledger.endpoint_margin_daily(start = '2026-03-04', end = '2026-03-05')"
        ).result_rows
    }
    # By hand: ep-1 10:00 1,000 requests at 0.5 $/1k, 11:00 3,000 at 1.0 $/1k: 3.5 $ of value
    # for 4 $ of GPUs; ep-2 1,000 requests at 5 $/1k for 1 $.
    assert margins == {
        "ep-1": (4000, 4.0, 1.0, 0.875, 3.5, -0.5),
        "ep-2": (1000, 1.0, 1.0, 5.0, 5.0, 4.0),
        "ep-3": (10, 1.0, 100.0, None, None, None),
    }

    policies = parse_policies(LOSING_POLICY)
    midnight = DAY + 24 * HOUR
    rows = Guard(db, policies, Actuators(), clock=lambda: midnight).check_once()
    assert [(r["target"], r["kind"], r["dry_run"], r["outcome"]) for r in rows] == [
        ("ep-1@endpoint", "notify", 1, "recorded"),
        ("ep-1@endpoint", "act", 1, "dry_run"),
    ]
    # A day of 4 $ of GPUs at stake (the policy's 24 h horizon); the loss in the reason.
    assert rows[1]["usd_at_stake"] == pytest.approx(4.0)
    assert "$0.50 lost" in rows[0]["reason"]
    # A budget condition holds for endpoints as for idle GPUs: nothing until the team's fires.
    budgeted = parse_policies(
        LOSING_POLICY.replace('"unprofitable-endpoints"', '"over-budget-endpoints"').replace(
            "idle_minutes = 60", 'idle_minutes = 60\nbudget = ["mtd_100"]'
        )
    )
    assert Guard(db, budgeted, Actuators(), clock=lambda: midnight).check_once() == []
    over = {"ts": round(midnight * 1000), "kind": "budget_burn", "rule": "mtd_100"}
    over |= {"state": "firing", "team": "serving", "since": round(DAY * 1000), "message": "over"}
    insert(db, "alerts", over | {"wasted_usd": 0.0, "idle_seconds": 0.0})
    again = Guard(db, budgeted, Actuators(), clock=lambda: midnight).check_once()
    assert [(r["target"], r["kind"]) for r in again] == [
        ("ep-1@endpoint", "notify"),
        ("ep-1@endpoint", "act"),
    ]


def test_a_process_left_after_its_job_ended_is_a_step_per_process(db: Client) -> None:
    job, gpu = "train-77", "GPU-o"
    labels = {"k8s_pod": "train-77-0", "k8s_namespace": "ml"}
    who = {"job_id": job, "team": "ml", "project": "p"}
    job_row = {**who, "state": "succeeded", "job_type": "training", "gpu_uuids": [gpu]}
    insert(db, "jobs", job_row | {"labels": labels, "updated_at": round(NOW * 1000)})
    fact = {"ts": round(NOW * 1000) - 60_000, "sign": 1, "node": "n1", "gpu_uuid": gpu}
    fact |= {"gpu_model": "H100", "duration_s": 1.0, "share": 1.0, "allocated": 0}
    insert(db, "cost_facts", fact | {"usd_per_gpu_hour": USD_PER_HOUR, "cost_usd": 0.001})
    for pid in (11, 12):
        alert = {"ts": round(NOW * 1000), "kind": "orphaned_gpu_memory", "state": "firing"}
        alert |= {"gpu_uuid": gpu, "node": "n1", **who, "rule": f"pid {pid}"}
        alert |= {"since": round((NOW - HOUR) * 1000), "idle_seconds": HOUR, "wasted_usd": 4.0}
        insert(db, "alerts", alert | {"message": f"process {pid} holds 6.0 GiB"})
    policies = parse_policies(
        """
[[policy]]
name = "orphans"
condition = "orphaned_memory"
idle_minutes = 15
horizon_hours = 1
match = { scheduler = "kubernetes" }
steps = [
  { kind = "notify", after_minutes = 0 },
  { kind = "act", after_minutes = 0, action = "delete_pod" },
]
"""
    )
    rows = Guard(db, policies, Actuators(), clock=lambda: NOW).check_once()
    assert sorted((r["target"], r["kind"], r["outcome"]) for r in rows) == [
        (f"{job}@{gpu}/pid 11", "act", "dry_run"),
        (f"{job}@{gpu}/pid 11", "notify", "recorded"),
        (f"{job}@{gpu}/pid 12", "act", "dry_run"),
        (f"{job}@{gpu}/pid 12", "notify", "recorded"),
    ]
    # An hour (the horizon) of a 4 $/h GPU at stake; the orphan's dollars in the reason.
    assert [r["usd_at_stake"] for r in rows] == [pytest.approx(4.0)] * 4
    assert "pid 11 holds GPU memory after its job ended" in rows[0]["reason"] + rows[2]["reason"]
    # Nothing is decided twice.
    assert Guard(db, policies, Actuators(), clock=lambda: NOW + 60).check_once() == []
