"""Generated fleets: every message a deployment publishes, in publish order, as hypothesis
strategies.

A fleet is a list of `{"topic", "key", "value"}` records (the format of `gpuledger replay`):
node descriptions, price entries, job events and usage events as plain JSON objects, and the
nodes' sample batches. It covers on-demand, spot and reserved nodes with negotiated
overrides and a node that changes its pricing model; price entries at several places that
take effect before and during the samples, some published late (backdated), some replacing
an entry of the same key; jobs with GPUs and jobs known only by their processes' labels,
sent in full, in part, twice, at the same moment with other values, or after their
samples, ending in every final state (or still running), some run again under the same id;
GPUs shared by processes with and without their own util_sm; MIG instances; products with no
price (L4) or no known model; inference jobs with usage events; re-sent sample batches and
batches that come after newer ones (a spool drained late); and, on request, idle stretches
just under and just over the idle alert threshold.

Times are whole milliseconds and utilizations Float32-exact, as the store keeps them; the
fleet starts 30 s before a UTC midnight so that daily views see two days.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from hypothesis import strategies as st

T0 = 1_767_311_970.0  # 2026-01-01T23:59:30Z
GiB = 1024**3
PRODUCTS = {
    "NVIDIA H100 80GB HBM3": ["1g.10gb", "3g.40gb", "1c.3g.40gb", "7g.80gb"],
    "NVIDIA A100-SXM4-80GB": ["2g.20gb", "1c.2g.20gb"],
    "NVIDIA A30": ["1g.6gb", "2g.12gb"],
    "NVIDIA L4": [],
    "Mystery Accelerator X": ["1g.10gb"],  # an unknown model: 7 slices
}
UTILS = [0.0, 0.03125, 0.25, 0.5, 0.75, 1.0]  # exact in Float32; 0.03125 is under 0.05
PRICINGS = ["on_demand", "spot", "reserved"]
PLACES = [("*", "*"), ("aws", "*"), ("aws", "us-east-1"), ("gcp", "europe-west4")]
MODELS = ["H100", "A100-80GB", "A30"]  # L4 is never priced: an unpriced model
STATES = ["succeeded", "failed", "preempted", "cancelled"]
JOB_TYPES = ["training", "inference", "tuning", "notebook"]
TEAMS = ["vision", "nlp", "speech"]
PROJECTS = ["detector", "chat", "asr"]


@dataclass
class Fleet:
    """A fleet's messages in publish order; its repr is the JSON lines `gpuledger replay`
    takes, so that a failing example prints a fleet one can replay."""

    messages: list[dict[str, Any]]

    def jsonl(self) -> str:
        return "\n".join(json.dumps(m, sort_keys=True) for m in self.messages)

    def __repr__(self) -> str:
        return f"Fleet of {len(self.messages)} messages (gpuledger replay lines):\n{self.jsonl()}"

    def count(self, topic: str) -> int:
        return sum(1 for m in self.messages if m["topic"] == topic)

    def late(self) -> int:
        """Metadata messages published after the first sample batch."""
        first = next((i for i, m in enumerate(self.messages) if m["topic"] == "samples"), 0)
        return sum(1 for m in self.messages[first:] if m["topic"] in ("jobs", "prices", "nodes"))

    def samples(self) -> int:
        return sum(len(m["value"]["samples"]) for m in self.messages if m["topic"] == "samples")


def _msg(topic: str, key: str, value: dict[str, Any]) -> dict[str, Any]:
    return {"topic": topic, "key": key, "value": value}


@st.composite
def fleets(
    draw: st.DrawFn,
    *,
    max_nodes: int = 2,
    max_gpus: int = 2,
    max_steps: int = 6,
    idle_after_s: float | None = None,
) -> Fleet:
    """A fleet; with `idle_after_s`, two more GPUs whose jobs idle for just under and just
    over that many seconds. Draws shrink towards the plain case: on time, sent once."""
    early: list[dict[str, Any]] = []
    late: list[dict[str, Any]] = []

    def publish(message: dict[str, Any], *, may_be_late: bool = True) -> None:
        (late if may_be_late and draw(st.integers(0, 3)) == 3 else early).append(message)

    # Nodes: some never described, some with an override, some that change pricing model.
    nodes = [f"node-{i}" for i in range(draw(st.integers(1, max_nodes)))]
    for node in nodes:
        if draw(st.integers(0, 4)) == 4:
            continue
        provider, region = draw(st.sampled_from(PLACES[1:]))
        info = {
            "v": 1,
            "ts": T0 - 60,
            "node": node,
            "provider": provider,
            "region": region,
            "pricing_model": draw(st.sampled_from(PRICINGS)),
            "usd_per_gpu_hour": draw(st.sampled_from([None, None, None, 2.5, 3.25])),
        }
        publish(_msg("nodes", node, info))
        if draw(st.booleans()):
            changed = dict(info, ts=T0 + draw(st.integers(1, max_steps)))
            changed["pricing_model"] = draw(st.sampled_from(PRICINGS))
            changed["usd_per_gpu_hour"] = draw(st.sampled_from([None, 1.75]))
            publish(_msg("nodes", node, changed))

    # Prices: effective before or during the samples; some backdated (late), some replaced.
    for _ in range(draw(st.integers(0, 7))):
        provider, region = draw(st.sampled_from(PLACES))
        model = draw(st.sampled_from(MODELS))
        pricing = draw(st.sampled_from(PRICINGS))
        frm = draw(st.sampled_from([0.0, T0 - 3600, T0 + 2, T0 + 4]))
        entry = {
            "v": 1,
            "provider": provider,
            "region": region,
            "gpu_model": model,
            "pricing_model": pricing,
            "usd_per_gpu_hour": draw(st.sampled_from([0.75, 1.0, 2.0, 3.5, 4.25])),
            "effective_from": frm,
        }
        publish(_msg("prices", f"{provider}/{region}/{model}/{pricing}/{frm}", entry))

    # GPUs, with their product, MIG profile and sampling interval.
    gpus: list[tuple[str, str, str, str | None, float]] = []
    for node in nodes:
        for g in range(draw(st.integers(1, max_gpus))):
            product = draw(st.sampled_from(sorted(PRODUCTS)))
            profiles = PRODUCTS[product]
            mig = draw(st.sampled_from([None, None, *profiles])) if profiles else None
            interval = draw(st.sampled_from([1.0, 1.0, 2.0, 0.5]))
            gpus.append((node, f"GPU-{node}-{g}", product, mig, interval))
    gpu_ids = [g[1] for g in gpus]

    # Jobs with GPUs: a start, maybe an end (full, or the state alone), maybe a repeat.
    jobs: dict[str, str] = {}
    for j in range(draw(st.integers(0, 3))):
        job_id = f"job-{j}"
        start = T0 + draw(st.integers(-5, max_steps))
        job_type = draw(st.sampled_from(JOB_TYPES))
        jobs[job_id] = job_type
        started = {
            "v": 1,
            "ts": start,
            "job_id": job_id,
            "state": "running",
            "team": draw(st.sampled_from(TEAMS)),
            "project": draw(st.sampled_from(PROJECTS)),
            "job_type": job_type,
            "experiment_id": draw(st.sampled_from([None, "exp-1"])),
            "model": draw(st.sampled_from([None, "llama-3-8b", "yolo-v9"])),
            "environment": draw(st.sampled_from([None, "prod", "dev"])),
            "gpu_uuids": draw(st.lists(st.sampled_from(gpu_ids), max_size=2, unique=True)),
            "started_at": start,
            "ended_at": None,
            "labels": {"owner": draw(st.sampled_from(["ana", "bo"]))},
        }
        publish(_msg("jobs", job_id, started))
        if draw(st.booleans()):
            publish(_msg("jobs", job_id, started))  # a sender that repeats itself
        if draw(st.integers(0, 3)) == 3:  # the same moment described again: the later wins
            publish(_msg("jobs", job_id, dict(started, team=draw(st.sampled_from(TEAMS)))))
        ending = draw(st.sampled_from(["none", "full", "state-only", "partial"]))
        end = start + draw(st.integers(1, max_steps))
        if ending == "full":
            publish(
                _msg(
                    "jobs",
                    job_id,
                    dict(started, ts=end, state=draw(st.sampled_from(STATES)), ended_at=end),
                )
            )
        elif ending == "state-only":  # an epilog that knows the exit state only
            state = draw(st.sampled_from(STATES))
            publish(_msg("jobs", job_id, {"v": 1, "ts": end, "job_id": job_id, "state": state}))
        elif ending == "partial":
            publish(_msg("jobs", job_id, {"v": 1, "ts": end, "job_id": job_id, "ended_at": end}))
        if ending != "none" and draw(st.integers(0, 3)) == 3:  # run again under the same id
            again = end + draw(st.integers(1, 3))
            publish(
                _msg(
                    "jobs",
                    job_id,
                    {
                        "v": 1,
                        "ts": again,
                        "job_id": job_id,
                        "state": "running",
                        "started_at": again,
                    },
                )
            )

    # Jobs known by labels only; some also finish through a job event with no GPUs.
    label_jobs: dict[str, dict[str, Any]] = {}
    for j in range(draw(st.integers(0, 3))):
        job_id = f"label-{j}"
        label_jobs[job_id] = {
            "job_id": job_id,
            "team": draw(st.sampled_from([None, *TEAMS])),
            "project": draw(st.sampled_from([None, *PROJECTS])),
            "job_type": draw(st.sampled_from([None, "inference", "training"])),
            "model": draw(st.sampled_from([None, "llama-3-8b"])),
            "environment": draw(st.sampled_from([None, "staging"])),
        }
        if draw(st.booleans()):
            event = {
                "v": 1,
                "ts": T0 + draw(st.integers(0, max_steps)),
                "job_id": job_id,
                "state": draw(st.sampled_from(["running", *STATES])),
            }
            if draw(st.booleans()):
                event["project"] = draw(st.sampled_from(PROJECTS))
            if draw(st.integers(0, 3)) == 3:  # a later model tag than the processes carry
                event["model"] = "mistral-7b"
            publish(_msg("jobs", job_id, event))
    # A job with GPUs whose processes also run, labelled, on a GPU it was not given.
    for job_id in sorted(jobs):
        if draw(st.integers(0, 3)) == 3:
            label_jobs[job_id] = {"job_id": job_id, "team": draw(st.sampled_from(TEAMS))}
    label_names = sorted(label_jobs)

    # Samples, one batch per node and sample time.
    steps = draw(st.integers(1, max_steps))
    by_batch: dict[tuple[str, float], list[dict[str, Any]]] = defaultdict(list)
    for node, gpu, product, mig, interval in gpus:
        for k in range(steps):
            ts = T0 + k * interval
            # GPM's SM activity where the GPU has it; a MIG instance's utilization is its SM
            # activity (the agent's rule), none without GPM
            sm = draw(st.sampled_from([None, None, 0.0, 0.03125, 0.5]))
            util = sm if mig else draw(st.sampled_from([None, *UTILS]))
            processes = []
            for pid in range(draw(st.integers(0, 2))):
                labels: dict[str, Any] = {}
                if draw(st.integers(0, 3)) != 0 and label_names:
                    labels = {
                        k: v
                        for k, v in label_jobs[draw(st.sampled_from(label_names))].items()
                        if v is not None
                    }
                processes.append(
                    {
                        "pid": 100 + pid,
                        "name": "python",
                        "util_sm": draw(st.sampled_from([None, 0.0, 0.25, 0.5])),
                        "mem_used_bytes": draw(st.sampled_from([0, 1, 3])) * GiB,
                        "labels": labels,
                    }
                )
            by_batch[(node, ts)].append(
                {
                    "v": 1,
                    "ts": ts,
                    "node": node,
                    "gpu_uuid": gpu,
                    "gpu_name": product,
                    "mig_profile": mig,
                    "interval_s": interval,
                    "util_sm": util,
                    "sm_active": sm,
                    "mem_used_bytes": draw(st.sampled_from([0, 2, 5])) * GiB,
                    "mem_total_bytes": 80 * GiB,
                    "power_w": 300.0,
                    "processes": processes,
                }
            )
    if idle_after_s is not None:
        _idle_gpus(draw, idle_after_s, early, late, by_batch)
    batches = [
        _msg("samples", node, {"v": 1, "node": node, "samples": samples})
        for (node, _), samples in sorted(by_batch.items(), key=lambda kv: (kv[0][1], kv[0][0]))
    ]
    resent = [b for b in batches if draw(st.integers(0, 5)) == 5]  # an agent re-sending
    # A node's spool drained after the rest: its batch comes after newer ones (the idle
    # node's never do, so that its episodes see their samples in order).
    spooled = [b for b in batches if b["key"] != "idle-node" and draw(st.integers(0, 7)) == 7]
    batches = [b for b in batches if b not in spooled] + spooled

    # Usage of the inference jobs, one event per distinct time.
    usage = []
    inference = sorted(
        {j for j, t in jobs.items() if t == "inference"}
        | {j for j, lab in label_jobs.items() if lab.get("job_type") == "inference"}
    )
    for job_id in inference:
        for k in sorted(draw(st.sets(st.integers(0, 59), max_size=3))):
            usage.append(
                _msg(
                    "usage",
                    job_id,
                    {
                        "v": 1,
                        "ts": T0 + k,
                        "job_id": job_id,
                        "requests": draw(st.integers(0, 500)),
                        "tokens": draw(st.integers(0, 90_000)),
                    },
                )
            )
    return Fleet(early + batches + resent + late + usage)


def _idle_gpus(
    draw: st.DrawFn,
    after_s: float,
    early: list[dict[str, Any]],
    late: list[dict[str, Any]],
    by_batch: dict[tuple[str, float], list[dict[str, Any]]],
) -> None:
    """Two GPUs of node `idle-node`, each held by a job that idles for one stretch: one
    just under `after_s` (no alert), one just over (an alert). A job's start may come after
    its samples: the alert is then decided on the restated facts."""
    node = "idle-node"
    stretch_under = int(after_s) - draw(st.integers(1, 2))
    stretch_over = int(after_s) + draw(st.integers(1, 2))
    for i, stretch in enumerate((stretch_under, stretch_over)):
        gpu, job_id = f"GPU-idle-{i}", f"idle-job-{i}"
        (late if draw(st.integers(0, 2)) == 2 else early).append(
            _msg(
                "jobs",
                job_id,
                {
                    "v": 1,
                    "ts": T0 - 10,
                    "job_id": job_id,
                    "state": "running",
                    "team": "vision",
                    "project": "detector",
                    "job_type": "training",
                    "gpu_uuids": [gpu],
                    "started_at": T0 - 10,
                },
            )
        )
        busy_before = 3
        for k in range(busy_before + stretch + 3):
            idle = busy_before <= k < busy_before + stretch
            by_batch[(node, T0 + k)].append(
                {
                    "v": 1,
                    "ts": T0 + k,
                    "node": node,
                    "gpu_uuid": gpu,
                    "gpu_name": "NVIDIA H100 80GB HBM3",
                    "interval_s": 1.0,
                    "util_sm": draw(st.sampled_from([0.0, 0.03125])) if idle else 0.75,
                    "mem_used_bytes": 4 * GiB,
                    "mem_total_bytes": 80 * GiB,
                    "power_w": 120.0,
                    "processes": [],
                }
            )
