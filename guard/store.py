"""What the guard reads from the store and writes to it."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from gpuledger.ledger.guard import Decision, Episode
from gpuledger.ledger.timekeys import to_ms

# Idle episodes firing now, with what the policies match on: the job's type and labels (jobs
# table), the GPU's model and what it costs the job per second (its newest fact).
OPEN_EPISODES = """
SELECT a.gpu_uuid, a.node, a.job_id, a.team, a.project,
       toUnixTimestamp64Milli(a.since) / 1000 AS since, a.wasted_usd,
       j.job_type, j.labels, f.gpu_model, f.usd_per_s, '' AS rule
FROM gpuledger.alerts_firing AS a
LEFT JOIN (SELECT job_id, job_type, labels FROM gpuledger.jobs FINAL) AS j
    ON j.job_id = a.job_id
LEFT JOIN (
    SELECT gpu_uuid, job_id, argMax(gpu_model, ts) AS gpu_model,
           argMax(usd_per_gpu_hour * share, ts) / 3600 AS usd_per_s
    FROM gpuledger.cost_facts
    WHERE sign = 1 AND (gpu_uuid, job_id) IN (
        SELECT gpu_uuid, job_id FROM gpuledger.alerts_firing WHERE kind = 'idle_allocated_gpu'
    )
    GROUP BY gpu_uuid, job_id
) AS f ON f.gpu_uuid = a.gpu_uuid AND f.job_id = a.job_id
WHERE a.kind = 'idle_allocated_gpu'
"""

BUDGETS_FIRING = """
SELECT team, project, rule FROM gpuledger.alerts_firing WHERE kind = 'budget_burn'
"""

# Inference endpoints whose GPU cost over the window exceeded what their requests were worth
# (every day of it valued: endpoint_margin_daily), with the job's type and labels.
LOSING_ENDPOINTS = """
SELECT m.endpoint, m.team, m.project, m.cost, m.value, j.job_type, j.labels
FROM
(
    SELECT d.endpoint AS endpoint, argMax(d.team, d.day) AS team,
           argMax(d.project, d.day) AS project, sum(d.cost_usd) AS cost, sum(d.value_usd) AS value
    FROM gpuledger.endpoint_margin_daily(
        start = {start:DateTime64(3, 'UTC')}, end = {end:DateTime64(3, 'UTC')}) AS d
    GROUP BY endpoint
    HAVING countIf(d.value_usd IS NULL) = 0 AND cost > value
) AS m
LEFT JOIN (SELECT job_id, job_type, labels FROM gpuledger.jobs FINAL) AS j
    ON j.job_id = m.endpoint
"""
LOSS_WINDOW_S = 86400.0
ENDPOINT = "endpoint"  # the gpu_uuid of an endpoint's episode: it spans its GPUs

# Processes holding GPU memory after their job ended (the worker's orphaned_gpu_memory alerts
# firing now), with the ended job's type and labels and what the GPU costs per second.
ORPHANS = """
SELECT a.gpu_uuid, a.node, a.job_id, a.team, a.project,
       toUnixTimestamp64Milli(a.since) / 1000 AS since, a.wasted_usd,
       j.job_type, j.labels, f.gpu_model, f.usd_per_s, a.rule
FROM gpuledger.alerts_firing AS a
LEFT JOIN (SELECT job_id, job_type, labels FROM gpuledger.jobs FINAL) AS j
    ON j.job_id = a.job_id
LEFT JOIN (
    SELECT gpu_uuid, argMax(gpu_model, ts) AS gpu_model,
           argMax(usd_per_gpu_hour, ts) / 3600 AS usd_per_s
    FROM gpuledger.cost_facts
    WHERE sign = 1 AND gpu_uuid IN (
        SELECT gpu_uuid FROM gpuledger.alerts_firing WHERE kind = 'orphaned_gpu_memory'
    )
    GROUP BY gpu_uuid
) AS f ON f.gpu_uuid = a.gpu_uuid
WHERE a.kind = 'orphaned_gpu_memory'
"""

TRAIL = """
SELECT policy, target, groupUniqArray(step) FROM gpuledger.guard_actions GROUP BY policy, target
"""

ACTS_SINCE = """
SELECT policy, count() FROM gpuledger.guard_actions
WHERE kind = 'act' AND dry_run = 0 AND decided_at > fromUnixTimestamp64Milli({t:Int64})
GROUP BY policy
"""

COLUMNS = (
    "decided_at",
    "policy",
    "target",
    "step",
    "kind",
    "action",
    "dry_run",
    "gpu_uuid",
    "node",
    "job_id",
    "team",
    "project",
    "idle_since",
    "usd_at_stake",
    "reason",
    "outcome",
)


def open_episodes(client: Any) -> list[Episode]:
    """The idle episodes firing now."""
    return _episodes(client, OPEN_EPISODES, "idle")


def orphan_episodes(client: Any) -> list[Episode]:
    """The orphaned GPU memory alerts firing now, one episode per process."""
    return _episodes(client, ORPHANS, "orphaned_memory")


def firing_budgets(client: Any) -> list[tuple[str, str, str]]:
    """(team, project, rule) of every budget alert firing now."""
    return [
        (team, project, rule) for team, project, rule in client.query(BUDGETS_FIRING).result_rows
    ]


def _episodes(client: Any, sql: str, kind: str) -> list[Episode]:
    found = []
    for row in client.query(sql).result_rows:
        gpu, node, job, team, project, since, wasted, job_type, labels, model, usd_per_s, rule = row
        found.append(
            Episode(
                gpu_uuid=gpu,
                node=node,
                job_id=job,
                team=team,
                project=project,
                idle_since=float(since),
                wasted_usd=float(wasted),
                job_type=job_type or "",
                labels=dict(labels or {}),
                gpu_model=model or "",
                usd_per_s=float(usd_per_s or 0.0),
                kind=kind,
                process=rule,
            )
        )
    return found


def losing_endpoints(client: Any, now: float) -> list[Episode]:
    """Endpoints losing money over the day before `now`, as episodes that began with it."""
    start = now - LOSS_WINDOW_S
    result = client.query(
        LOSING_ENDPOINTS,
        parameters={
            "start": datetime.fromtimestamp(start, UTC),
            "end": datetime.fromtimestamp(now, UTC),
        },
    )
    return [
        Episode(
            gpu_uuid=ENDPOINT,
            node="",
            job_id=endpoint,
            team=team,
            project=project,
            idle_since=start,
            wasted_usd=float(cost) - float(value),
            job_type=job_type or "",
            labels=dict(labels or {}),
            usd_per_s=float(cost) / LOSS_WINDOW_S,
            kind="losing_money",
        )
        for endpoint, team, project, cost, value, job_type, labels in result.result_rows
    ]


def taken_steps(client: Any) -> dict[str, dict[str, set[int]]]:
    """The steps already decided, per target and policy: the guard's memory across restarts."""
    taken: dict[str, dict[str, set[int]]] = defaultdict(dict)
    for policy, target, steps in client.query(TRAIL).result_rows:
        taken[target][policy] = {int(s) for s in steps}
    return taken


def acts_since(client: Any, t: float) -> dict[str, int]:
    rows = client.query(ACTS_SINCE, parameters={"t": to_ms(t)}).result_rows
    return {policy: int(n) for policy, n in rows}


def row_of(decision: Decision, episode: Episode, outcome: str) -> dict[str, Any]:
    return {
        "decided_at": decision.decided_at,
        "policy": decision.policy,
        "target": decision.target,
        "step": decision.step,
        "kind": decision.kind,
        "action": decision.action.value if decision.action else "",
        "dry_run": int(decision.dry_run),
        "gpu_uuid": episode.gpu_uuid,
        "node": episode.node,
        "job_id": episode.job_id,
        "team": episode.team,
        "project": episode.project,
        "idle_since": episode.idle_since,
        "usd_at_stake": decision.usd_at_stake,
        "reason": decision.reason,
        "outcome": outcome,
    }


def record(client: Any, rows: Sequence[dict[str, Any]]) -> None:
    if not rows:
        return
    data = [
        [to_ms(r[c]) if c in ("decided_at", "idle_since") else r[c] for c in COLUMNS] for r in rows
    ]
    client.insert("gpuledger.guard_actions", data, column_names=list(COLUMNS))
