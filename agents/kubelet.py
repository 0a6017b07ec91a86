"""Pods from the kubelet's pod list: names for the metrics, labels for the jobs.

A process's cgroup gives its pod UID and container ID (`agents/attribution.py`); the kubelet
of the node knows the pod's name, namespace, labels and container names. `KubeletPods` keeps
the kubelet's `/pods` list (refreshed in the background, and soon after an unknown pod shows
up) so that a lookup during a read never waits on the network.

Pod labels name a process's job when its environment does not: `gpuledger.io/job-id`,
`gpuledger.io/team`, `gpuledger.io/project`, `gpuledger.io/job-type`,
`gpuledger.io/experiment-id`. What the process's environment says wins.
"""

from __future__ import annotations

import json
import logging
import ssl
import threading
import time
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gpuledger.agents.attribution import Attributor, ProcessAttribution
from gpuledger.agents.metrics import PodInfo
from gpuledger.schema.messages import JobType, ProcessLabels

log = logging.getLogger(__name__)

SERVICE_ACCOUNT = Path("/var/run/secrets/kubernetes.io/serviceaccount")
POD_LABELS = {
    "job_id": "gpuledger.io/job-id",
    "team": "gpuledger.io/team",
    "project": "gpuledger.io/project",
    "job_type": "gpuledger.io/job-type",
    "experiment_id": "gpuledger.io/experiment-id",
    "model": "gpuledger.io/model",
    "environment": "gpuledger.io/environment",
}


@dataclass(frozen=True)
class Pod:
    uid: str
    name: str
    namespace: str
    labels: Mapping[str, str] = field(default_factory=dict)
    containers: Mapping[str, str] = field(default_factory=dict)  # container id -> name


def parse_pod_list(data: Mapping[str, Any]) -> dict[str, Pod]:
    """The kubelet's `/pods` answer (a PodList) as pods by UID; odd entries are skipped."""
    pods: dict[str, Pod] = {}
    for item in data.get("items") or ():
        meta = item.get("metadata") or {}
        uid, name = meta.get("uid"), meta.get("name")
        if not uid or not name:
            continue
        containers: dict[str, str] = {}
        status = item.get("status") or {}
        for key in ("containerStatuses", "initContainerStatuses"):
            for container in status.get(key) or ():
                # "containerd://<id>", "cri-o://<id>", "docker://<id>"
                container_id = (container.get("containerID") or "").rpartition("://")[2]
                if container_id and container.get("name"):
                    containers[container_id] = container["name"]
        pods[uid] = Pod(
            uid=uid,
            name=name,
            namespace=meta.get("namespace") or "",
            labels=dict(meta.get("labels") or {}),
            containers=containers,
        )
    return pods


def labels_from_pod(pod: Pod) -> ProcessLabels:
    values: dict[str, Any] = {}
    for label_field, key in POD_LABELS.items():
        value = (pod.labels.get(key) or "").strip()[:256]
        if value:
            values[label_field] = value
    if "job_type" in values:
        try:
            values["job_type"] = JobType(values["job_type"].lower())
        except ValueError:
            values["job_type"] = JobType.other
    return ProcessLabels(**values)


class KubeletPods:
    """The kubelet's pod list, kept fresh by a thread; lookups never block."""

    def __init__(
        self,
        url: str,
        *,
        token_file: Path | None = None,
        ca_file: Path | None = None,
        insecure_tls: bool = False,
        refresh_s: float = 30.0,
        timeout_s: float = 3.0,
    ) -> None:
        self.url = url
        self.refresh_s = refresh_s
        self.timeout_s = timeout_s
        if token_file is None and (SERVICE_ACCOUNT / "token").exists():
            token_file = SERVICE_ACCOUNT / "token"
        if ca_file is None and (SERVICE_ACCOUNT / "ca.crt").exists():
            ca_file = SERVICE_ACCOUNT / "ca.crt"
        self.token_file = token_file
        self._context: ssl.SSLContext | None = None
        if url.startswith("https://"):
            if insecure_tls:
                # The kubelet's serving certificate is often self-signed (as metrics-server's
                # --kubelet-insecure-tls knows).
                self._context = ssl.create_default_context()
                self._context.check_hostname = False
                self._context.verify_mode = ssl.CERT_NONE
            else:
                self._context = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
        self._pods: dict[str, Pod] = {}
        self.generation = 0  # how many lists were fetched
        self.errors = 0
        self._wanted = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kubelet-pods", daemon=True)
        self._last_error: str | None = None
        self._first = threading.Event()

    def start(self, wait_s: float = 3.0) -> KubeletPods:
        """Start refreshing; wait up to `wait_s` for the first list, so first samples have it."""
        self._thread.start()
        self._first.wait(wait_s)
        return self

    def close(self) -> None:
        self._stop.set()
        self._wanted.set()
        self._thread.join(timeout=self.timeout_s + 1)

    # -- lookups (any thread)

    def pod(self, uid: str) -> Pod | None:
        found = self._pods.get(uid)
        if found is None:
            self._wanted.set()  # a pod we do not know yet: fetch the list soon
        return found

    def __call__(self, pod_uid: str, container_id: str | None) -> PodInfo | None:
        """The metrics' PodLookup: the pod's and the container's names."""
        found = self.pod(pod_uid)
        if found is None:
            return None
        container = found.containers.get(container_id or "", "")
        return PodInfo(found.name, found.namespace, container)

    # -- the thread

    def fetch(self) -> dict[str, Pod]:
        request = urllib.request.Request(self.url, headers={"Accept": "application/json"})
        if self.token_file is not None:
            token = self.token_file.read_text().strip()
            request.add_header("Authorization", f"Bearer {token}")
        with urllib.request.urlopen(request, timeout=self.timeout_s, context=self._context) as r:
            return parse_pod_list(json.load(r))

    def _run(self) -> None:
        last = 0.0
        while not self._stop.is_set():
            try:
                self._pods = self.fetch()
                self.generation += 1
                if self._last_error is not None:
                    log.info("kubelet pod list at %s is readable again", self.url)
                self._last_error = None
            except (OSError, ValueError) as exc:
                self.errors += 1
                if self._last_error is None:
                    log.warning(
                        "cannot read the kubelet's pod list at %s (%s): pods stay unnamed; "
                        "check --kubelet-url and the agent's service account (nodes/proxy)",
                        self.url,
                        exc,
                    )
                self._last_error = str(exc)
            self._first.set()
            last = time.monotonic()
            self._wanted.wait(self.refresh_s)
            self._wanted.clear()
            # at most one fetch every 2 s, however many new pods show up
            self._stop.wait(max(0.0, last + 2.0 - time.monotonic()))


class PodLabelAttributor:
    """An attributor whose processes in pods also get their pod's job labels (env wins)."""

    def __init__(self, base: Attributor, pods: KubeletPods) -> None:
        self.base = base
        self.pods = pods
        self._merged: dict[int, tuple[ProcessAttribution, int, ProcessAttribution]] = {}

    def __call__(self, pid: int) -> ProcessAttribution:
        found = self.base(pid)
        if found.pod_uid is None:
            return found
        cached = self._merged.get(pid)
        if cached is not None and cached[0] is found and cached[1] == self.pods.generation:
            return cached[2]
        pod = self.pods.pod(found.pod_uid)
        merged = found
        if pod is not None:
            from_pod = labels_from_pod(pod)
            updates = {
                name: getattr(from_pod, name)
                for name in POD_LABELS
                if getattr(found.labels, name) is None and getattr(from_pod, name) is not None
            }
            if updates:
                merged = ProcessAttribution(
                    name=found.name,
                    container_id=found.container_id,
                    pod_uid=found.pod_uid,
                    labels=found.labels.model_copy(update=updates),
                )
        self._merged[pid] = (found, self.pods.generation, merged)
        return merged

    def prune(self, live_pids: set[int]) -> None:
        prune = getattr(self.base, "prune", None)
        if callable(prune):
            prune(live_pids)
        for pid in [p for p in self._merged if p not in live_pids]:
            del self._merged[pid]
