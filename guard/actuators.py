"""Carrying out a step: Slurm (`scontrol requeue`, `scancel`), Kubernetes (scale the pod's
Deployment or StatefulSet to zero, suspend its Job, delete a bare pod) and webhooks (notices,
and the `webhook` action). Each is idempotent (doing it twice leaves the job as doing it once),
bounded by a timeout, and retried with backoff; each returns the outcome to record: `done`,
`notified`, or `failed: WHY`.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from gpuledger.ledger.guard import Action, Decision, Episode
from gpuledger.ledger.timekeys import iso_utc

RETRIES = 3
BACKOFF_S = 1.0

log = logging.getLogger("gpuledger.guard")


def with_backoff(
    attempt: Callable[[], str], retries: int = RETRIES, backoff_s: float = BACKOFF_S
) -> str:
    """Run `attempt` until it returns an outcome that is not `retry: …`, at most `retries`
    times, waiting `backoff_s`, then twice that, between tries."""
    outcome = "failed: not tried"
    for n in range(retries):
        outcome = attempt()
        if not outcome.startswith("retry: "):
            return outcome
        time.sleep(backoff_s * 2**n)
    return "failed: " + outcome.removeprefix("retry: ")


def run_command(
    argv: list[str],
    timeout_s: float,
    *,
    stdin: str | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str] | str:
    """The finished command, or the outcome when it could not finish: failed when there is no
    such command, retry when it ran past `timeout_s`."""
    try:
        return subprocess.run(
            argv, input=stdin, capture_output=True, text=True, env=env, timeout=timeout_s
        )
    except FileNotFoundError:
        return f"failed: {argv[0]} not found on PATH"
    except subprocess.TimeoutExpired:
        return f"retry: {argv[0]} gave no answer in {timeout_s:g} s"


@dataclass(frozen=True)
class Slurm:
    """`scontrol requeue JOB` and `scancel JOB`. A job Slurm no longer runs counts as done."""

    scontrol: str = "scontrol"
    scancel: str = "scancel"
    timeout_s: float = 30.0

    def act(self, action: Action, episode: Episode) -> str:
        if action is Action.requeue:
            argv = [self.scontrol, "requeue", episode.job_id]
        elif action is Action.cancel:
            argv = [self.scancel, episode.job_id]
        else:
            return f"failed: Slurm cannot {action.value}"
        return with_backoff(lambda: self._run(argv))

    def _run(self, argv: list[str]) -> str:
        done = run_command(argv, self.timeout_s)
        if isinstance(done, str):
            return done
        if done.returncode == 0:
            return "done"
        said = (done.stderr or done.stdout).strip().splitlines()
        text = said[-1] if said else f"exit status {done.returncode}"
        if "already completing or completed" in text or "Invalid job id" in text:
            return "done"  # the job is gone: nothing left to stop
        return f"retry: {' '.join(argv[:2])}: {text}"


@dataclass(frozen=True)
class ExecHook:
    """Runs the policy's command with the decision as JSON on its standard input and in
    `GPULEDGER_*` environment variables; exit status 0 is done. The command is the policy
    owner's: it must stop the job idempotently (a repeated step runs it again)."""

    command: tuple[str, ...]
    timeout_s: float = 60.0

    def act(self, decision: Decision, episode: Episode) -> str:
        body = payload(decision, episode)
        env = {
            **os.environ,
            **{f"GPULEDGER_{k.upper()}": str(v) for k, v in body.items() if k != "text"},
        }

        def attempt() -> str:
            done = run_command(list(self.command), self.timeout_s, stdin=json.dumps(body), env=env)
            if isinstance(done, str):
                return done
            if done.returncode == 0:
                return "done"
            said = (done.stderr or done.stdout).strip().splitlines()
            return f"retry: {self.command[0]} exited {done.returncode}" + (
                f": {said[-1]}" if said else ""
            )

        return with_backoff(attempt)


def post_json(
    url: str, body: Any, timeout_s: float, headers: Mapping[str, str] | None = None
) -> str:
    """One POST: `ok`, `retry: WHY` (no answer, 5xx, 429) or `failed: WHY` (any other 4xx)."""
    request = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        method="POST",
        headers={"Content-Type": "application/json", **(headers or {})},
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as answer:
            answer.read()
    except urllib.error.HTTPError as exc:
        if exc.code < 500 and exc.code != 429:
            return f"failed: {url} answered {exc.code}"
        return f"retry: {url} answered {exc.code}"
    except (urllib.error.URLError, OSError) as exc:
        return f"retry: {url}: {getattr(exc, 'reason', exc)}"
    return "ok"


@dataclass(frozen=True)
class Webhook:
    """POST the decision as JSON. `Idempotency-Key` lets a receiver drop a repeated step."""

    url: str
    timeout_s: float = 10.0

    def send(self, decision: Decision, episode: Episode) -> str:
        body = payload(decision, episode)
        key = {"Idempotency-Key": f"{decision.policy}/{decision.target}/{decision.step}"}
        outcome = with_backoff(lambda: post_json(self.url, body, self.timeout_s, key))
        if outcome != "ok":
            return outcome
        return "done" if decision.kind == "act" else "notified"


@dataclass(frozen=True)
class AlertmanagerNotices:
    """Every step, dry runs included, posted to Alertmanager's API v2 as an alert
    `GpuGuardrailStep`, labelled like the worker's alerts (team, project, job_id, gpu_uuid,
    node) and with the policy, the step's kind and action and whether it is a dry run, so
    Alertmanager's routes take it to the team that owns the job. A notice ends by itself
    after `hold_s`: it tells of a moment, it is not a state that resolves."""

    url: str
    timeout_s: float = 10.0
    hold_s: float = 3600.0

    def alert(self, decision: Decision, episode: Episode, now: float) -> dict[str, Any]:
        said = payload(decision, episode)
        labels = {
            "alertname": (
                "GpuEndpointLosingMoney" if episode.kind == "losing_money" else "GpuGuardrailStep"
            ),
            "severity": "critical" if decision.kind == "act" else "warning",
            "policy": decision.policy,
            "step": decision.kind,
            "action": said["action"],
            "dry_run": str(decision.dry_run).lower(),
            "team": episode.team,
            "project": episode.project,
            "job_id": episode.job_id,
            "gpu_uuid": episode.gpu_uuid,
            "node": episode.node,
        }
        return {
            "labels": {name: value for name, value in labels.items() if value},
            "annotations": {
                "summary": said["text"],
                "description": decision.reason,
                "usd_at_stake": f"{decision.usd_at_stake:.2f}",
            },
            "startsAt": iso_utc(now, "milliseconds"),
            "endsAt": iso_utc(now + self.hold_s, "milliseconds"),
        }

    def send(self, decision: Decision, episode: Episode, now: float) -> str:
        body = [self.alert(decision, episode, now)]
        return with_backoff(
            lambda: post_json(f"{self.url.rstrip('/')}/api/v2/alerts", body, self.timeout_s)
        )


def payload(decision: Decision, episode: Episode) -> dict[str, Any]:
    """What a notice or a webhook action says, with a line a chat room can show as it is."""
    losing = episode.kind == "losing_money"
    verb = {
        "notify": {
            "losing_money": "costs more than its requests bring",
            "orphaned_memory": "holds GPU memory after its job ended",
        }.get(episode.kind, "is idle"),
        "announce": "will be stopped",
        "act": "was stopped",
    }[decision.kind]
    if decision.kind == "act" and decision.dry_run:
        verb = "would be stopped"
    what = decision.action.value if decision.action else ""
    dry = " (dry run: nothing was done)" if decision.dry_run and decision.kind == "act" else ""
    if losing:
        subject = f"Endpoint {episode.job_id}"
    elif episode.kind == "orphaned_memory":
        subject = f"Process {episode.process.removeprefix('pid ')} on GPU {episode.gpu_uuid}"
    else:
        subject = f"GPU {episode.gpu_uuid} of job {episode.job_id}"
    return {
        "policy": decision.policy,
        "step": decision.step,
        "kind": decision.kind,
        "condition": episode.kind,
        "action": what,
        "dry_run": decision.dry_run,
        "target": decision.target,
        "job_id": episode.job_id,
        "team": episode.team,
        "project": episode.project,
        "gpu_uuid": episode.gpu_uuid,
        "node": episode.node,
        "idle_since": episode.idle_since,
        "usd_at_stake": round(decision.usd_at_stake, 2),
        "reason": decision.reason,
        "text": (
            f"{subject} (team {episode.team}) {verb}"
            f"{f' ({what})' if what and decision.kind != 'notify' else ''}: {decision.reason}; "
            f"${decision.usd_at_stake:,.2f} at stake{dry}"
        ),
    }


class Kubernetes:
    """Acts on the pod the job's labels name (`k8s_namespace`, `k8s_pod`), through its owner:
    ReplicaSet -> Deployment or a StatefulSet scaled to 0 replicas, a Job suspended, a pod
    without a controller deleted. `api` is a kubernetes `ApiClient` (in-cluster or kubeconfig)."""

    def __init__(self, api: Any) -> None:
        from kubernetes import client

        self.core = client.CoreV1Api(api)
        self.apps = client.AppsV1Api(api)
        self.batch = client.BatchV1Api(api)

    def act(self, action: Action, episode: Episode) -> str:
        namespace = episode.labels.get("k8s_namespace", "")
        pod_name = episode.labels.get("k8s_pod", "")
        if not namespace or not pod_name:
            return "failed: the job's labels name no pod (k8s_namespace, k8s_pod)"
        return with_backoff(lambda: self._act(action, namespace, pod_name))

    def _act(self, action: Action, namespace: str, pod_name: str) -> str:
        from kubernetes.client.exceptions import ApiException

        try:
            kind, name = self._controller(namespace, pod_name)
            return self._apply(action, namespace, kind, name)
        except ApiException as exc:
            if exc.status == 404:
                return "done"  # the pod (or its owner) is gone already
            if exc.status is not None and exc.status < 500 and exc.status != 429:
                return f"failed: Kubernetes answered {exc.status} {exc.reason}"
            return f"retry: Kubernetes answered {exc.status} {exc.reason}"

    def _controller(self, namespace: str, pod_name: str) -> tuple[str, str]:
        """The pod's top controller: (Deployment|StatefulSet|Job|Pod, name)."""
        pod: Any = self.core.read_namespaced_pod(pod_name, namespace)
        owner = _controller_of(pod.metadata.owner_references)
        if owner is None:
            return "Pod", pod_name
        if owner.kind == "ReplicaSet":
            replica_set: Any = self.apps.read_namespaced_replica_set(owner.name, namespace)
            parent = _controller_of(replica_set.metadata.owner_references)
            return (parent.kind, parent.name) if parent else ("ReplicaSet", owner.name)
        return owner.kind, owner.name

    def _apply(self, action: Action, namespace: str, kind: str, name: str) -> str:
        scale = {"spec": {"replicas": 0}}
        if action is Action.scale_to_zero and kind == "Deployment":
            self.apps.patch_namespaced_deployment_scale(name, namespace, scale)
        elif action is Action.scale_to_zero and kind == "StatefulSet":
            self.apps.patch_namespaced_stateful_set_scale(name, namespace, scale)
        elif action is Action.suspend and kind == "Job":
            self.batch.patch_namespaced_job(name, namespace, {"spec": {"suspend": True}})
        elif action is Action.delete_pod and kind == "Pod":
            self.core.delete_namespaced_pod(name, namespace)
        else:
            fits = {"Deployment": "scale_to_zero", "StatefulSet": "scale_to_zero", "Job": "suspend"}
            return (
                f"failed: the pod belongs to {kind} {name}; {fits.get(kind, 'delete_pod')} fits it"
            )
        return "done"


def _controller_of(owners: Any) -> Any:
    for owner in owners or []:
        if owner.controller:
            return owner
    return None


@dataclass
class Actuators:
    """Who carries out what: each scheduler's actuator, when the guard is given one."""

    slurm: Slurm | None = None
    kubernetes: Kubernetes | None = None
    webhooks: Mapping[str, Webhook] | None = None  # policy name -> its webhook
    exec_hooks: Mapping[str, ExecHook] | None = None  # policy name -> its command
    alertmanager: AlertmanagerNotices | None = None  # every step, to the owners' routes

    def carry_out(self, decision: Decision, episode: Episode) -> str:
        """Do what a decision says and return its outcome. Notices, and dry-run act steps,
        go to the policy's webhook when it has one (the owner hears what would be done), and
        every step to Alertmanager when the guard has one: a notice that cannot be posted is
        logged, never holds up the step."""
        outcome = self._carry_out(decision, episode)
        if self.alertmanager is not None:
            posted = self.alertmanager.send(decision, episode, time.time())
            if posted != "ok":
                log.warning(
                    "guard: Alertmanager notice of %s not posted: %s", decision.target, posted
                )
        return outcome

    def _carry_out(self, decision: Decision, episode: Episode) -> str:
        hook = (self.webhooks or {}).get(decision.policy)
        if decision.kind == "act" and decision.action is Action.webhook:
            if decision.dry_run:
                return "dry_run"
            return hook.send(decision, episode) if hook else "failed: the policy has no webhook_url"
        if decision.kind != "act":
            return hook.send(decision, episode) if hook else "recorded"
        outcome = "dry_run" if decision.dry_run else self._act(decision, episode)
        if hook:
            hook.send(decision, episode)  # the owner is told; the action's outcome is recorded
        return outcome

    def _act(self, decision: Decision, episode: Episode) -> str:
        assert decision.action is not None
        if decision.action is Action.exec_hook:
            command = (self.exec_hooks or {}).get(decision.policy)
            return command.act(decision, episode) if command else "failed: no exec command"
        if decision.action in (Action.requeue, Action.cancel):
            if self.slurm is None:
                return "failed: the guard has no Slurm access (scontrol and scancel)"
            return self.slurm.act(decision.action, episode)
        if self.kubernetes is None:
            return "failed: the guard has no Kubernetes access (in-cluster or kubeconfig)"
        return self.kubernetes.act(decision.action, episode)
