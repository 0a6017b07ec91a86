"""Kubernetes job events: watch pods that request `nvidia.com/gpu` and publish a `JobEvent`
when one starts, changes or ends.

- job id: the pod label `gpuledger.io/job-id` (configurable) when set, else
  `<namespace>/<pod name>`. Give GPU pods the same id in their environment
  (`GPULEDGER_JOB_ID` from the downward API, deploy/k8s/README.md) so the node agent labels
  their processes with it.
- team, project, job type, experiment, model, environment: pod labels, names configurable
  (defaults `gpuledger.io/team`, `gpuledger.io/project`, `gpuledger.io/job-type`,
  `gpuledger.io/experiment-id`, `gpuledger.io/model`, `gpuledger.io/environment`).
- state: phase Pending → pending, Running → running, Succeeded → succeeded, Failed →
  failed; a pod the cluster stopped (condition DisruptionTarget: preemption, eviction, node
  shutdown) → preempted; a pod deleted before it finished → cancelled.
- GPU UUIDs are not in the pod object (the kubelet's device plugin assigns them on the
  node), so events carry none: the agent attributes the pod's GPUs through its processes.

`pod_job_event` and `JobEventTracker` are pure and take the watch stream's raw JSON, so tests
replay recorded events; `watch_pods` is the loop on the kubernetes client.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from gpuledger.schema.messages import JobEvent, JobState, JobType

log = logging.getLogger("gpuledger.k8s")

GPU_RESOURCE = "nvidia.com/gpu"
_PHASES = {
    "Pending": JobState.pending,
    "Running": JobState.running,
    "Succeeded": JobState.succeeded,
    "Failed": JobState.failed,
}


@dataclass(frozen=True)
class LabelNames:
    """Which pod labels carry gpuledger's job metadata."""

    job_id: str = "gpuledger.io/job-id"
    team: str = "gpuledger.io/team"
    project: str = "gpuledger.io/project"
    job_type: str = "gpuledger.io/job-type"
    experiment_id: str = "gpuledger.io/experiment-id"
    model: str = "gpuledger.io/model"
    environment: str = "gpuledger.io/environment"


def _quantity(value: Any) -> float:
    text = str(value).strip()
    try:
        return float(text)
    except ValueError:
        return 0.0  # extended resources are whole numbers; anything else is not a GPU count


def gpus_requested(pod: Mapping[str, Any]) -> int:
    """GPUs the pod's containers ask for (limits, else requests)."""
    total = 0.0
    for container in pod.get("spec", {}).get("containers", []) or []:
        resources = container.get("resources", {}) or {}
        limits = resources.get("limits", {}) or {}
        requests = resources.get("requests", {}) or {}
        total += _quantity(limits.get(GPU_RESOURCE, requests.get(GPU_RESOURCE, 0)))
    return int(total)


def _epoch(text: str | None) -> float | None:
    if not text:
        return None
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def _finished_at(status: Mapping[str, Any]) -> float | None:
    ends = [
        _epoch(c.get("state", {}).get("terminated", {}).get("finishedAt"))
        for c in status.get("containerStatuses", []) or []
    ]
    known = [e for e in ends if e is not None]
    return max(known) if known else None


def _started_at(status: Mapping[str, Any]) -> float | None:
    starts = [
        _epoch(
            (c.get("state", {}).get("running") or c.get("state", {}).get("terminated") or {}).get(
                "startedAt"
            )
        )
        for c in status.get("containerStatuses", []) or []
    ]
    known = [s for s in starts if s is not None]
    return min(known) if known else _epoch(status.get("startTime"))


def _disrupted(status: Mapping[str, Any]) -> bool:
    return any(
        c.get("type") == "DisruptionTarget" and c.get("status") == "True"
        for c in status.get("conditions", []) or []
    )


def job_id_of(pod: Mapping[str, Any], names: LabelNames = LabelNames()) -> str:
    meta = pod.get("metadata", {})
    labels = meta.get("labels", {}) or {}
    return labels.get(names.job_id) or f"{meta.get('namespace', 'default')}/{meta.get('name')}"


def pod_job_event(
    event_type: str, pod: Mapping[str, Any], now: float, names: LabelNames = LabelNames()
) -> JobEvent | None:
    """The JobEvent a watch event means, or None for pods without GPUs and events that say
    nothing about a job (BOOKMARK, ERROR)."""
    if event_type not in ("ADDED", "MODIFIED", "DELETED") or gpus_requested(pod) <= 0:
        return None
    meta = pod.get("metadata", {})
    status = pod.get("status", {}) or {}
    labels = meta.get("labels", {}) or {}
    phase = status.get("phase", "")
    state = _PHASES.get(phase)
    ended_at = _finished_at(status) if state in (JobState.succeeded, JobState.failed) else None
    # The cluster, not the job, stopped it: preemption, eviction, node shutdown.
    stopped = state is JobState.failed or (
        event_type == "DELETED" and state in (JobState.running, JobState.pending)
    )
    if stopped and _disrupted(status):
        state = JobState.preempted
    if event_type == "DELETED" and state in (JobState.pending, JobState.running, None):
        state = JobState.cancelled
        ended_at = _epoch(meta.get("deletionTimestamp")) or now
    if state is None:
        return None
    if state.finished and ended_at is None:
        ended_at = now
    job_type_text = (labels.get(names.job_type) or "").lower()
    job_type: JobType | None = None
    if job_type_text:
        try:
            job_type = JobType(job_type_text)
        except ValueError:
            job_type = JobType.other
    return JobEvent(
        ts=now,
        job_id=job_id_of(pod, names),
        state=state,
        team=labels.get(names.team) or None,
        project=labels.get(names.project) or None,
        job_type=job_type,
        experiment_id=labels.get(names.experiment_id) or None,
        model=labels.get(names.model) or None,
        environment=labels.get(names.environment) or None,
        started_at=_started_at(status) if state is not JobState.pending else None,
        ended_at=ended_at,
        labels={
            "k8s_namespace": str(meta.get("namespace", "")),
            "k8s_pod": str(meta.get("name", "")),
            "k8s_pod_uid": str(meta.get("uid", "")),
            "k8s_node": str(pod.get("spec", {}).get("nodeName") or ""),
            "gpus_requested": str(gpus_requested(pod)),
        },
    )


@dataclass
class JobEventTracker:
    """Turns a pod watch stream into the job events worth publishing: a pod is MODIFIED
    many times (probes, conditions) but only a change of state or metadata is news."""

    names: LabelNames = field(default_factory=LabelNames)
    _last: dict[str, tuple[Any, ...]] = field(default_factory=dict)

    def observe(self, event_type: str, pod: Mapping[str, Any], now: float) -> JobEvent | None:
        event = pod_job_event(event_type, pod, now, self.names)
        if event is None:
            return None
        key = (
            event.state,
            event.team,
            event.project,
            event.job_type,
            event.experiment_id,
            event.model,
            event.environment,
            event.started_at,
            event.ended_at,
            event.labels.get("k8s_node") if event.labels else None,
        )
        if self._last.get(event.job_id) == key:
            return None
        previous = self._last.get(event.job_id)
        if previous is not None and previous[0] is not None and JobState(previous[0]).finished:
            return None  # a finished job stays finished: a later DELETED is not a cancellation
        self._last[event.job_id] = key
        return event

    def replay(self, events: Iterable[Mapping[str, Any]], now: float) -> list[JobEvent]:
        """Events of a recorded watch stream (`{"type", "object"}` dicts)."""
        out = []
        for item in events:
            found = self.observe(str(item.get("type")), item.get("object") or {}, now)
            if found is not None:
                out.append(found)
        return out


def watch_pods(
    core_v1: Any,
    publish: Callable[[JobEvent], None],
    *,
    names: LabelNames = LabelNames(),
    namespace: str | None = None,
    label_selector: str | None = None,
    stop: Callable[[], bool] = lambda: False,
    timeout_s: int = 300,
    clock: Callable[[], float] = time.time,
) -> int:
    """Watch pods with the kubernetes client's CoreV1Api and publish their job events until
    `stop()`; return how many were published. A watch that expires (410 Gone) starts again
    from a fresh list, which repeats only events the tracker has already seen."""
    from kubernetes import watch
    from kubernetes.client.exceptions import ApiException

    tracker = JobEventTracker(names)
    published = 0
    resource_version: str | None = None
    while not stop():
        watcher = watch.Watch()
        if namespace:
            lister: Any = core_v1.list_namespaced_pod
            kwargs: dict[str, Any] = {"namespace": namespace}
        else:
            lister, kwargs = core_v1.list_pod_for_all_namespaces, {}
        if label_selector:
            kwargs["label_selector"] = label_selector
        if resource_version:
            kwargs["resource_version"] = resource_version
        seen = 0
        try:
            for item in watcher.stream(lister, timeout_seconds=timeout_s, **kwargs):
                seen += 1
                raw = item.get("raw_object") or {}
                resource_version = (
                    raw.get("metadata", {}).get("resourceVersion") or resource_version
                )
                event = tracker.observe(str(item.get("type")), raw, clock())
                if event is not None:
                    publish(event)
                    published += 1
                if stop():
                    watcher.stop()
                    break
        except ApiException as exc:
            if exc.status != 410:
                raise
            log.info("pod watch expired (410 Gone): listing again")
            resource_version = None
        if not seen and not stop():
            time.sleep(1.0)  # the API server closed an empty watch: do not spin
    return published
