"""A second cost model, written from the contract alone: plain, slow and exact.

It imports nothing from `streams/` nor `schema/`: it reads the messages as the JSON objects
that are published (`{"topic", "key", "value"}` records in publish order, the format of
`gpuledger replay`), and computes with `fractions.Fraction` wherever money is computed, so
that the worker's floats are compared with exact values.

What it returns is the answer a worker must reach once every message has been taken in,
late ones included: every sample costed with everything known at the end (cancel and
restate make the stored facts converge to that), then the analyst views summed as their SQL
sums `value * sign`.

The rules it encodes, each as the contract reads:

Messages
 R1  A sample is identified by (gpu_uuid, ts to the ms); one that arrives again is counted
     once (the first copy is the one costed).
 R2  Prices: entries with the same key (provider, region, gpu_model, pricing_model,
     effective_from) replace each other, the last published winning (compacted topic).
 R3  Nodes: each `NodeInfo` governs its node from its ts to the node's next one; the first
     also governs the samples before it; two at the same ts: the last published wins. A node
     never described is provider `*`, region `*`, on_demand, no override.
 R4  Job merge: a field is changed by an event that carries it (null = absent) when the
     event's ts is >= the ts of the event that set it (labels per key); so late, older
     events fill gaps and never overwrite newer state; at equal ts the later published wins.
 R5  Restart: a started_at set by a newer event than the one that set ended_at, and later
     than ended_at, clears ended_at.
Allocation (contract 4.1, 4.4)
 R6  A job holds GPU g at t when g is in its gpu_uuids, started_at is known and <= t, and t
     is before its end: ended_at, else (for a finished state) the ts of the event that set
     that state, else never. Several holders: latest started_at, then smallest job_id.
 R7  No holder: the jobs named by processes' labels.job_id split the GPU by util_sm (silent
     processes count 0; denominator max(GPU util_sm, sum)); when no process reports a util_sm
     or that denominator is 0, by mem_used_bytes (denominator max(GPU memory, sum)); when that
     is 0 too, equally per process. Each labelled job gets a row (share 0 included), and the
     remainder (when > 1e-12) is an unallocated row (job_id ''). No label: one unallocated row.
 R8  A label job's team/project/job_type/experiment_id come from its merged job record field
     by field, else from the first of its processes (in sample order) that carries them.
Price (4.2, 4.3)
 R9  Rate = the node's override, else the price book entry for (provider, region, model,
     pricing model): most specific place first ((p, r), (p, *), (*, *)), of that place the
     latest effective_from <= t. The model comes from the product name; an unknown product
     keeps its raw name and is priced by an override only. No rate: 0 and price_missing = 1.
 R10 MIG: `Ng.*` is N/slices, `Mc.Ng.*` is M/slices (slices: 4 on A30, else 7), capped at 1,
     applied to an override too. cost = rate x fraction x interval_s / 3600 x share.
Waste (4.5)
 R11 The judged utilization is the GPU's util_sm; with the sm_active idle basis it is the GPU's
     sm_active where the sample has one. idle_cost = cost x (1 - judged), 0 when it is null;
     idle = 1 when the row is allocated and judged < threshold (never when null).
 R12 An idle episode of (GPU, job): the job's allocated rows of that GPU in ts order whose
     judged utilization (R11) is under the threshold; it fires when its idle seconds (sum of
     the idle samples' interval_s) reach idle_alert_after_s before a sample of the GPU that is not
     an idle row of that job breaks it. A sample judged null neither counts nor breaks
     the episode of a job it carries; one that does not carry the job (the job no longer
     holds the GPU) ends it.
Views (5, and the view SQL) -- measures are sums over live rows, Float32 columns
(duration_s, share, util_sm) taken at Float32 precision as the store keeps them:
 R13 job_costs: per job_id != '': gpu_seconds, cost, idle cost, time-weighted mean util_sm
     (NULL without a row with util_sm or with zero weight), distinct GPUs, first/last ts;
     team/project/... of its latest sample, else of the job record; state of the record;
     time-weighted mean sm_active the same way (NULL without a row with sm_active).
 R14 team_daily: per UTC day and team ('' = unallocated): gpu_hours, cost, idle cost,
     allocated cost, price-missing gpu_hours, mean util_sm.
 R15 project_effective_cost: per project: spend = allocated cost; jobs finished/succeeded
     from the merged records (finished = succeeded, failed, preempted, cancelled);
     success rate; utilization = mean util_sm over allocated rows; effective cost =
     spend / (rate x utilization), NULL when nothing succeeded or utilization <= 1e-9;
     sm_utilization and effective_cost_sm_usd the same with mean sm_active.
 R16 inference_unit_cost: per job and UTC day, for jobs whose facts or record say
     `inference`, joined (outer) with every usage event's requests and tokens of that day.
 R17 idle_waste: per (team, project, job_id, GPU, node) of allocated rows: gpu_seconds,
     cost, idle gpu_seconds (rows with idle = 1), idle cost.
"""

from __future__ import annotations

import math
import re
import struct
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from fractions import Fraction
from typing import Any

WILDCARD = "*"
FINISHED = ("succeeded", "failed", "preempted", "cancelled")
JOB_FIELDS = (
    "state",
    "team",
    "project",
    "job_type",
    "experiment_id",
    "model",
    "environment",
    "gpu_uuids",
    "started_at",
    "ended_at",
)
LABEL_FIELDS = ("team", "project", "job_type", "experiment_id", "model", "environment")
# The canonical models of the contract for the product names the fleets use, with their MIG
# slice counts; the first pattern that matches wins.
MODELS = (
    (r"\bH100\b", "H100", 7),
    (r"\bA100\b.*\b80\s*GB\b", "A100-80GB", 7),
    (r"\bA30\b", "A30", 4),
    (r"\bL4\b", "L4", None),
)


def f32(value: float) -> float:
    """A float as a Float32 column stores it."""
    return float(struct.unpack("f", struct.pack("f", value))[0])


def ms(t: float) -> int:
    return round(t * 1000)


def model_of(product: str) -> tuple[str | None, int | None]:
    for pattern, model, slices in MODELS:
        if re.search(pattern, product, re.IGNORECASE):
            return model, slices
    return None, None


# --- metadata -----------------------------------------------------------------------------


@dataclass
class Job:
    job_id: str
    values: dict[str, Any] = field(default_factory=dict)
    stamp: dict[str, float] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)
    ts: float = -math.inf

    def get(self, name: str) -> Any:
        return self.values.get(name)

    def merge(self, event: dict[str, Any]) -> None:
        ts = float(event["ts"])
        for name in JOB_FIELDS:
            value = event.get(name)
            if value is None:
                continue
            if ts >= self.stamp.get(name, -math.inf):
                self.values[name] = tuple(value) if name == "gpu_uuids" else value
                self.stamp[name] = ts
        for key, value in (event.get("labels") or {}).items():
            if ts >= self.stamp.get("labels." + key, -math.inf):
                self.labels[key] = value
                self.stamp["labels." + key] = ts
        self.ts = max(self.ts, ts)
        start, end = self.values.get("started_at"), self.values.get("ended_at")
        if (
            start is not None
            and end is not None
            and end < start
            and self.stamp["started_at"] > self.stamp["ended_at"]
        ):
            del self.values["ended_at"]
            self.stamp["ended_at"] = self.stamp["started_at"]

    def end(self) -> float:
        if self.get("ended_at") is not None:
            return float(self.get("ended_at"))
        if self.get("state") in FINISHED:
            return self.stamp["state"]
        return math.inf

    def holds(self, gpu: str, t: float) -> bool:
        start = self.get("started_at")
        if start is None:
            return False
        return start <= t < self.end() and gpu in (self.get("gpu_uuids") or ())


@dataclass
class Metadata:
    jobs: dict[str, Job] = field(default_factory=dict)
    prices: dict[tuple[str, str, str, str, float], float] = field(default_factory=dict)
    nodes: dict[str, dict[float, dict[str, Any]]] = field(default_factory=dict)
    samples: dict[tuple[str, int], dict[str, Any]] = field(default_factory=dict)
    usage: list[dict[str, Any]] = field(default_factory=list)

    def take(self, topic: str, value: dict[str, Any]) -> None:
        topic = topic.rsplit(".", 1)[-1]
        if topic == "jobs":
            self.jobs.setdefault(value["job_id"], Job(value["job_id"])).merge(value)
        elif topic == "prices":
            key = (
                value.get("provider", WILDCARD),
                value.get("region", WILDCARD),
                value["gpu_model"],
                value["pricing_model"],
                float(value.get("effective_from", 0.0)),
            )
            self.prices[key] = value["usd_per_gpu_hour"]
        elif topic == "nodes":
            self.nodes.setdefault(value["node"], {})[float(value["ts"])] = value
        elif topic == "samples":
            for sample in value["samples"]:
                self.samples.setdefault((sample["gpu_uuid"], ms(sample["ts"])), sample)
        elif topic == "usage":
            self.usage.append(value)
        else:
            raise ValueError(f"a reference fleet has no topic {topic!r}")

    def node_at(self, node: str, t: float) -> dict[str, Any] | None:
        history = self.nodes.get(node)
        if not history:
            return None
        stamps = sorted(history)
        before = [s for s in stamps if s <= t]
        return history[before[-1] if before else stamps[0]]

    def price(self, provider: str, region: str, model: str, pricing: str, t: float) -> Any:
        for place in ((provider, region), (provider, WILDCARD), (WILDCARD, WILDCARD)):
            found = [
                (frm, usd)
                for (p, r, m, pm, frm), usd in self.prices.items()
                if (p, r) == place and m == model and pm == pricing and frm <= t
            ]
            if found:
                return max(found)[1]
        return None


# --- facts --------------------------------------------------------------------------------


def _fraction(value: Any) -> Fraction:
    return Fraction(value) if value is not None else Fraction(0)


def _split(sample: dict[str, Any]) -> list[tuple[str, Fraction, list[dict[str, Any]]]]:
    """R7: (job_id, exact share, its processes' labels) per labelled job, then the rest."""
    procs = sample.get("processes") or []
    named: dict[str, list[int]] = defaultdict(list)
    for i, proc in enumerate(procs):
        job_id = (proc.get("labels") or {}).get("job_id")
        if job_id:
            named[job_id].append(i)
    if not named:
        return [("", Fraction(1), [])]
    denominator = Fraction(0)
    if any(p.get("util_sm") is not None for p in procs):
        weights = [_fraction(p.get("util_sm")) for p in procs]
        denominator = max(_fraction(sample.get("util_sm")), sum(weights, Fraction(0)))
    if denominator <= 0:
        weights = [Fraction(int(p.get("mem_used_bytes", 0))) for p in procs]
        denominator = max(Fraction(int(sample.get("mem_used_bytes", 0))), sum(weights, Fraction(0)))
    if denominator <= 0:
        weights = [Fraction(1)] * len(procs)
        denominator = Fraction(len(procs))
    out = []
    for job_id in sorted(named):
        part = min(Fraction(1), sum((weights[i] for i in named[job_id]), Fraction(0)) / denominator)
        out.append((job_id, part, [procs[i].get("labels") or {} for i in named[job_id]]))
    rest = 1 - sum((part for _, part, _ in out), Fraction(0))
    if rest > Fraction(1, 10**12):
        out.append(("", rest, []))
    return out


def _mig_fraction(profile: str | None, slices: int | None) -> Fraction:
    if not profile:
        return Fraction(1)
    n = re.search(r"\b(\d+)g\.", profile, re.IGNORECASE)
    if n is None:
        return Fraction(1)
    c = re.search(r"\b(\d+)c\.", profile, re.IGNORECASE)
    used = int(c.group(1)) if c else int(n.group(1))
    return min(Fraction(1), Fraction(used, slices or 7))


def judged(util_sm: float | None, sm_active: float | None, basis: str) -> float | None:
    """R11: what idleness is judged by."""
    if basis == "sm_active" and sm_active is not None:
        return sm_active
    return util_sm


def facts(meta: Metadata, idle_threshold: float, basis: str = "busy_time") -> list[dict[str, Any]]:
    """One row per (sample, job), every sample costed with all that is known (R6-R11)."""
    rows = []
    for (gpu, _), sample in sorted(meta.samples.items()):
        t = float(sample["ts"])
        holders = [j for j in meta.jobs.values() if j.holds(gpu, t)]
        parts: list[tuple[str, Fraction, list[dict[str, Any]]]]
        if holders:
            best = min(holders, key=lambda j: (-j.get("started_at"), j.job_id))
            parts = [(best.job_id, Fraction(1), [])]
        else:
            parts = _split(sample)
        info = meta.node_at(sample["node"], t)
        provider = info.get("provider", WILDCARD) if info else WILDCARD
        region = info.get("region", WILDCARD) if info else WILDCARD
        pricing = info.get("pricing_model", "on_demand") if info else "on_demand"
        model, slices = model_of(sample["gpu_name"])
        usd = info.get("usd_per_gpu_hour") if info else None
        if usd is None and model is not None:
            usd = meta.price(provider, region, model, pricing, t)
        rate = _fraction(usd) * _mig_fraction(sample.get("mig_profile"), slices)
        interval = Fraction(sample.get("interval_s", 1.0))
        util = sample.get("util_sm")
        sm = sample.get("sm_active")
        idle_util = judged(util, sm, basis)
        for job_id, share, labels in parts:
            job = meta.jobs.get(job_id)
            attrs = {}
            for name in LABEL_FIELDS:
                value = job.get(name) if job else None
                if value is None and labels:  # R8: a label job's gaps from its processes
                    value = next((lab.get(name) for lab in labels if lab.get(name)), None)
                attrs[name] = value or ""
            cost = rate * interval / 3600 * share
            allocated = job_id != ""
            rows.append(
                {
                    "ts": t,
                    "node": sample["node"],
                    "gpu_uuid": gpu,
                    "gpu_model": model or sample["gpu_name"],
                    "job_id": job_id,
                    **attrs,
                    "provider": provider,
                    "region": region,
                    "pricing_model": pricing,
                    "duration_s": float(interval),
                    "share": share,
                    "util_sm": util,
                    "cost_usd": cost,
                    "idle_cost_usd": (
                        Fraction(0) if idle_util is None else cost * (1 - Fraction(idle_util))
                    ),
                    "allocated": allocated,
                    "idle": allocated and idle_util is not None and idle_util < idle_threshold,
                    "price_missing": usd is None,
                    "sm_active": sm,
                }
            )
    return rows


# --- views --------------------------------------------------------------------------------


def gpu_seconds(row: dict[str, Any]) -> float:
    """duration_s x share as the store has them (Float32 columns)."""
    return f32(row["duration_s"]) * f32(float(row["share"]))


def _mean_util(rows: list[dict[str, Any]], name: str = "util_sm") -> float | None:
    with_util = [r for r in rows if r.get(name) is not None]
    weight = math.fsum(gpu_seconds(r) for r in with_util)
    if not with_util or weight <= 0:
        return None
    return math.fsum(f32(r[name]) * gpu_seconds(r) for r in with_util) / weight


def _day(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).date().isoformat()


def _money(rows: list[dict[str, Any]], name: str = "cost_usd") -> float:
    """An exact sum (the reference's Fractions, or a worker's floats taken exactly)."""
    return float(sum((Fraction(r[name]) for r in rows), Fraction(0)))


def _group(rows: list[dict[str, Any]], key: Any) -> dict[Any, list[dict[str, Any]]]:
    groups: dict[Any, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        groups[key(row)].append(row)
    return groups


def job_record(job: Job) -> dict[str, Any]:
    """A merged job as the `jobs` table keeps it ('' and NULL for what is unknown)."""
    return {
        "state": job.get("state") or "",
        "team": job.get("team") or "",
        "project": job.get("project") or "",
        "job_type": job.get("job_type") or "",
        "experiment_id": job.get("experiment_id") or "",
        "model": job.get("model") or "",
        "environment": job.get("environment") or "",
        "started_at": job.get("started_at"),
        "ended_at": job.get("ended_at"),
        "gpu_uuids": tuple(sorted(job.get("gpu_uuids") or ())),
    }


def views(
    rows: list[dict[str, Any]], jobs: dict[str, dict[str, Any]], usage: list[dict[str, Any]]
) -> dict[str, dict[Any, dict[str, Any]]]:
    """The analyst views (R13-R17) of these fact rows, merged jobs and usage events."""
    out: dict[str, dict[Any, dict[str, Any]]] = {}

    job_costs = {}
    for job_id, group in _group([r for r in rows if r["job_id"]], lambda r: r["job_id"]).items():
        latest = max(group, key=lambda r: r["ts"])
        record = jobs.get(job_id)
        answer = {name: latest[name] or (record[name] if record else "") for name in LABEL_FIELDS}
        answer.update(
            state=record["state"] if record else "",
            gpu_seconds=math.fsum(gpu_seconds(r) for r in group),
            cost_usd=_money(group),
            idle_cost_usd=_money(group, "idle_cost_usd"),
            mean_util_sm=_mean_util(group),
            mean_sm_active=_mean_util(group, "sm_active"),
            gpus=len({r["gpu_uuid"] for r in group}),
            first_ts=min(r["ts"] for r in group),
            last_ts=latest["ts"],
        )
        job_costs[job_id] = answer
    out["job_costs"] = job_costs

    team_daily = {}
    for (day, team), group in _group(rows, lambda r: (_day(r["ts"]), r["team"])).items():
        team_daily[(day, team)] = {
            "gpu_hours": math.fsum(gpu_seconds(r) for r in group) / 3600,
            "cost_usd": _money(group),
            "idle_cost_usd": _money(group, "idle_cost_usd"),
            "allocated_cost_usd": _money([r for r in group if r["allocated"]]),
            "price_missing_gpu_hours": math.fsum(
                gpu_seconds(r) for r in group if r["price_missing"]
            )
            / 3600,
            "mean_util_sm": _mean_util(group),
        }
    out["team_daily"] = team_daily

    allocated = [r for r in rows if r["allocated"]]
    projects = {}
    spend = _group(allocated, lambda r: r["project"])
    finished = [j for j in jobs.values() if j["state"] in FINISHED]
    for project in set(spend) | {j["project"] for j in finished}:
        group = spend.get(project, [])
        done = [j for j in finished if j["project"] == project]
        succeeded = sum(1 for j in done if j["state"] == "succeeded")
        rate = succeeded / len(done) if done else None
        utilization = _mean_util(group)
        sm_utilization = _mean_util(group, "sm_active")
        total = _money(group)
        effective = effective_sm = None
        if succeeded and rate and utilization is not None and utilization > 1e-9:
            effective = total / (rate * utilization)
        if succeeded and rate and sm_utilization is not None and sm_utilization > 1e-9:
            effective_sm = total / (rate * sm_utilization)
        projects[project] = {
            "total_spend_usd": total,
            "jobs_finished": len(done),
            "jobs_succeeded": succeeded,
            "job_success_rate": rate,
            "resource_utilization": utilization,
            "effective_cost_usd": effective,
            "sm_utilization": sm_utilization,
            "effective_cost_sm_usd": effective_sm,
        }
    out["project_effective_cost"] = projects

    inference = {j for j, rec in jobs.items() if rec["job_type"] == "inference"}
    inference |= {r["job_id"] for r in rows if r["job_type"] == "inference" and r["job_id"]}
    cost_days = _group(
        [r for r in rows if r["job_id"] in inference], lambda r: (r["job_id"], _day(r["ts"]))
    )
    used = _group(usage, lambda u: (u["job_id"], _day(u["ts"])))
    units = {}
    for key in set(cost_days) | set(used):
        requests = sum(int(u.get("requests", 0)) for u in used.get(key, []))
        tokens = sum(int(u.get("tokens", 0)) for u in used.get(key, []))
        cost = _money(cost_days.get(key, []))
        units[key] = {
            "cost_usd": cost,
            "requests": requests,
            "tokens": tokens,
            "usd_per_1k_requests": 1000 * cost / requests if requests else None,
            "usd_per_1m_tokens": 1_000_000 * cost / tokens if tokens else None,
        }
    out["inference_unit_cost"] = units

    waste = {}
    by_place = _group(
        allocated,
        lambda r: (r["team"], r["project"], r["job_id"], r["gpu_uuid"], r["node"]),
    )
    for key, group in by_place.items():
        waste[key] = {
            "gpu_seconds": math.fsum(gpu_seconds(r) for r in group),
            "cost_usd": _money(group),
            "idle_gpu_seconds": math.fsum(gpu_seconds(r) for r in group if r["idle"]),
            "idle_cost_usd": _money(group, "idle_cost_usd"),
        }
    out["idle_waste"] = waste

    out["totals"] = {
        "all": {
            "rows": len(rows),
            "cost_usd": _money(rows),
            "idle_cost_usd": _money(rows, "idle_cost_usd"),
            "gpu_seconds": math.fsum(gpu_seconds(r) for r in rows),
            "price_missing_rows": sum(1 for r in rows if r["price_missing"]),
        }
    }
    return out


def idle_alerts(
    rows: list[dict[str, Any]], after_s: float, basis: str = "busy_time"
) -> set[tuple[str, str]]:
    """R12: the (gpu_uuid, job_id) episodes that fire."""
    fired: set[tuple[str, str]] = set()
    by_gpu = _group(rows, lambda r: r["gpu_uuid"])
    for gpu, group in by_gpu.items():
        stamps = sorted({r["ts"] for r in group})
        at: dict[float, list[dict[str, Any]]] = _group(group, lambda r: r["ts"])
        running: dict[str, float] = {}  # job_id -> idle seconds of its open episode
        for t in stamps:
            here = at[t]
            if judged(here[0]["util_sm"], here[0].get("sm_active"), basis) is None:
                # neither idle nor busy for the jobs it carries
                carried = {r["job_id"] for r in here}
                running = {j: s for j, s in running.items() if j in carried}
                continue
            idle_jobs = {r["job_id"]: r["duration_s"] for r in here if r["idle"]}
            running = {j: running.get(j, 0.0) + d for j, d in idle_jobs.items()}
            for job_id, seconds in running.items():
                if seconds >= after_s - 1e-9:
                    fired.add((gpu, job_id))
    return fired


@dataclass
class Expected:
    """What the worker must reach for a fleet."""

    rows: list[dict[str, Any]]
    jobs: dict[str, dict[str, Any]]
    views: dict[str, dict[Any, dict[str, Any]]]
    alerts: set[tuple[str, str]]


def expect(
    messages: list[dict[str, Any]],
    *,
    idle_threshold: float = 0.05,
    idle_after_s: float = 600.0,
    idle_basis: str = "busy_time",
) -> Expected:
    """The expected facts, job records, views and firing idle episodes of these messages."""
    meta = Metadata()
    for message in messages:
        meta.take(message["topic"], message["value"])
    rows = facts(meta, idle_threshold, idle_basis)
    jobs = {job_id: job_record(job) for job_id, job in meta.jobs.items()}
    alerts = idle_alerts(rows, idle_after_s, idle_basis)
    return Expected(rows, jobs, views(rows, jobs, meta.usage), alerts)
