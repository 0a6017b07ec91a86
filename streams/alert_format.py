"""What alert receivers are sent: Alertmanager's postable alerts, webhook bodies, labels."""

from __future__ import annotations

from typing import Any

from gpuledger.ledger.budgets import SEVERITY, month_of
from gpuledger.ledger.idle import AlertEvent
from gpuledger.ledger.timekeys import iso_utc
from gpuledger.schema.messages import AlertKind, AlertState

ALERTNAME = {
    AlertKind.idle_allocated_gpu: "GpuIdleAllocated",
    AlertKind.budget_burn: "GpuBudgetBurn",
    AlertKind.orphaned_gpu_memory: "GpuOrphanedMemory",
}


def alert_labels(event: AlertEvent) -> dict[str, str]:
    a = event.alert
    labels = {
        "alertname": ALERTNAME[a.kind],
        "severity": SEVERITY.get(event.rule, "warning"),
        "team": a.team,
        "project": a.project,
        "job_id": a.job_id,
        "gpu_uuid": a.gpu_uuid,
        "node": a.node,
        "rule": event.rule,
    }
    if a.kind is AlertKind.budget_burn:
        labels["month"] = month_of(a.since)
    return {name: value for name, value in labels.items() if value}


def summary(event: AlertEvent) -> str:
    a = event.alert
    if a.kind is AlertKind.idle_allocated_gpu:
        owner = "/".join(p for p in (a.team, a.project) if p) or "no team"
        return (
            f"Idle allocated GPU {a.gpu_uuid} on {a.node}: job {a.job_id} ({owner}), "
            f"{a.idle_seconds / 60:.0f} min idle, ${a.wasted_usd:,.2f} wasted"
        )
    if a.kind is AlertKind.orphaned_gpu_memory:
        return (
            f"Orphaned GPU memory on {a.gpu_uuid} ({a.node}): {a.message}, for "
            f"{a.idle_seconds / 60:.0f} min, ${a.wasted_usd:,.2f} of GPU time"
        )
    return a.message


def alertmanager_alert(event: AlertEvent) -> dict[str, Any]:
    """One postable alert of Alertmanager's API v2."""
    a = event.alert
    starts = event.fired_at or a.ts
    body: dict[str, Any] = {
        "labels": alert_labels(event),
        "annotations": {
            "summary": summary(event),
            "description": a.message,
            "wasted_usd": f"{a.wasted_usd:.2f}",
        },
        "startsAt": iso_utc(starts, "milliseconds"),
    }
    if a.state is AlertState.resolved:
        body["endsAt"] = iso_utc(max(a.ts, starts), "milliseconds")
    return body


def webhook_body(event: AlertEvent, *, slack: bool) -> dict[str, Any]:
    a = event.alert
    text = f"[{a.state.value.upper()}] {summary(event)}"
    if a.state is AlertState.resolved:
        text += f" ({a.message})"
    if slack:
        return {"text": text}
    return {
        "version": 1,
        "source": "gpuledger",
        "status": a.state.value,
        "rule": event.rule,
        "labels": alert_labels(event),
        "text": text,
        "alert": a.model_dump(mode="json"),
    }
