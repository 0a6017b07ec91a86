"""A small, known fleet in the real store: two hours of cost facts (with a cancel and restate,
a shared GPU, a MIG slice, an unpriced GPU), jobs, inference usage and alerts.

10:00–12:00 UTC on 2026-11-20, one fact row per GPU, job and 10 s sample:

- GPU-a0 (node-a, on_demand): train-1 (vision/detector, training, exp-42) until 11:30, util
  0.9; then nobody, util 0.
- GPU-a1 (node-a, on_demand): train-1 until 11:30; then train-2 (share 0.6) and nobody (0.4),
  util 0.5.
- GPU-b0 (node-b, spot): infer-1 (search/ranker, inference), util 0.5; its first minute was
  written unallocated, then cancelled and restated.
- GPU-b1 (node-b, spot): nb-1 (research/notebooks, notebook), idle at util 0.01.
- MIG-c0 (node-c, reserved, 1g.10gb): tune-1 (vision/detector, tuning, exp-42) until 11:00,
  util null (MIG).
- GPU-c1 (node-c, reserved): nobody, and no price.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

START = datetime(2026, 11, 20, 10, 0, tzinfo=UTC)
END = START + timedelta(hours=2)
STEP_S = 10
IDLE_THRESHOLD = 0.05

FACT_COLUMNS = [
    "ts",
    "sign",
    "node",
    "gpu_uuid",
    "gpu_model",
    "mig_profile",
    "job_id",
    "team",
    "project",
    "job_type",
    "experiment_id",
    "provider",
    "region",
    "pricing_model",
    "duration_s",
    "share",
    "util_sm",
    "mem_used_bytes",
    "power_w",
    "usd_per_gpu_hour",
    "cost_usd",
    "idle_cost_usd",
    "allocated",
    "idle",
    "price_missing",
    "model",
    "environment",
]

JOBS = {
    "train-1": ("vision", "detector", "training", "exp-42"),
    "train-2": ("vision", "detector", "training", "exp-43"),
    "infer-1": ("search", "ranker", "inference", ""),
    "nb-1": ("research", "notebooks", "notebook", ""),
    "tune-1": ("vision", "detector", "tuning", "exp-42"),
}
# (model, environment) tags of the jobs
TAGS = {
    "train-1": ("yolo-v9", "research"),
    "train-2": ("yolo-v9", "research"),
    "infer-1": ("ranker-v3", "prod"),
    "nb-1": ("", "dev"),
    "tune-1": ("yolo-v9", "research"),
}


@dataclass(frozen=True)
class Gpu:
    uuid: str
    node: str
    model: str
    pricing: str
    usd_per_gpu_hour: float
    mig_profile: str = ""


GPUS = {
    "GPU-a0": Gpu("GPU-a0", "node-a", "H100", "on_demand", 4.0),
    "GPU-a1": Gpu("GPU-a1", "node-a", "H100", "on_demand", 4.0),
    "GPU-b0": Gpu("GPU-b0", "node-b", "A100-80GB", "spot", 1.5),
    "GPU-b1": Gpu("GPU-b1", "node-b", "A100-80GB", "spot", 1.5),
    "MIG-c0": Gpu("MIG-c0", "node-c", "A100-80GB", "reserved", 3.0 / 7, "1g.10gb"),
    "GPU-c1": Gpu("GPU-c1", "node-c", "A100-80GB", "reserved", 0.0),
}


def _row(gpu: Gpu, ts: datetime, job: str, share: float, util: float | None, sign: int = 1):
    team, project, job_type, experiment = JOBS.get(job, ("", "", "", ""))
    cost = gpu.usd_per_gpu_hour * STEP_S / 3600 * share
    allocated = 1 if job else 0
    idle = 1 if allocated and util is not None and util < IDLE_THRESHOLD else 0
    return [
        ts,
        sign,
        gpu.node,
        gpu.uuid,
        gpu.model,
        gpu.mig_profile,
        job,
        team,
        project,
        job_type,
        experiment,
        "aws",
        "us-east-1",
        gpu.pricing,
        float(STEP_S),
        share,
        util,
        10 << 30,
        300.0,
        gpu.usd_per_gpu_hour,
        cost,
        0.0 if util is None else cost * (1 - util),
        allocated,
        idle,
        1 if gpu.usd_per_gpu_hour == 0 else 0,
        *TAGS.get(job, ("", "")),
    ]


def fact_rows() -> list[list[Any]]:
    rows: list[list[Any]] = []
    switch = START + timedelta(minutes=90)
    tune_end = START + timedelta(hours=1)
    t = START
    while t < END:
        a0, a1, b0, b1, c0, c1 = (GPUS[k] for k in GPUS)
        if t < switch:
            rows.append(_row(a0, t, "train-1", 1.0, 0.9))
            rows.append(_row(a1, t, "train-1", 1.0, 0.9))
        else:
            rows.append(_row(a0, t, "", 1.0, 0.0))
            rows.append(_row(a1, t, "train-2", 0.6, 0.5))
            rows.append(_row(a1, t, "", 0.4, 0.5))
        if t < START + timedelta(minutes=1):
            # The job event arrived late: the sample was written unallocated, then restated.
            rows.append(_row(b0, t, "", 1.0, 0.5))
            rows.append(_row(b0, t, "", 1.0, 0.5, sign=-1))
        rows.append(_row(b0, t, "infer-1", 1.0, 0.5))
        rows.append(_row(b1, t, "nb-1", 1.0, 0.01))
        if t < tune_end:
            rows.append(_row(c0, t, "tune-1", 1.0, None))
        rows.append(_row(c1, t, "", 1.0, 0.0))
        t += timedelta(seconds=STEP_S)
    return rows


def job_rows() -> list[list[Any]]:
    def at(minutes: int) -> datetime:
        return START + timedelta(minutes=minutes)

    states = {
        "train-1": ("succeeded", ["GPU-a0", "GPU-a1"], at(0), at(90)),
        "train-2": ("failed", ["GPU-a1"], at(90), at(120)),
        "infer-1": ("running", ["GPU-b0"], at(0), None),
        "nb-1": ("running", ["GPU-b1"], at(0), None),
        "tune-1": ("preempted", ["MIG-c0"], at(0), at(60)),
    }
    rows = []
    for job, (state, gpus, started, ended) in states.items():
        team, project, job_type, experiment = JOBS[job]
        rows.append(
            [job, state, team, project, job_type, experiment, gpus, started, ended, {}, at(121)]
        )
    return rows


def usage_rows() -> list[list[Any]]:
    return [[START + timedelta(minutes=m), "infer-1", 600, 60_000] for m in range(0, 120)]


def alert_rows() -> list[list[Any]]:
    def at(minutes: float) -> datetime:
        return START + timedelta(minutes=minutes)

    b1_wasted = 1.5 * 0.99 / 60  # per minute idle on GPU-b1
    return [
        # nb-1 idles on GPU-b1 from 10:00: fired at 10:10, updated at 11:55.
        [
            "idle_allocated_gpu",
            "firing",
            "GPU-b1",
            "node-b",
            "nb-1",
            "research",
            "notebooks",
            at(0),
            at(10),
            600.0,
            10 * b1_wasted,
            "GPU-b1 idle",
        ],
        [
            "idle_allocated_gpu",
            "firing",
            "GPU-b1",
            "node-b",
            "nb-1",
            "research",
            "notebooks",
            at(0),
            at(115),
            115 * 60.0,
            115 * b1_wasted,
            "GPU-b1 idle",
        ],
        # An episode that resolved: must not show as firing.
        [
            "idle_allocated_gpu",
            "firing",
            "GPU-a0",
            "node-a",
            "train-1",
            "vision",
            "detector",
            at(0),
            at(12),
            720.0,
            0.5,
            "GPU-a0 idle",
        ],
        [
            "idle_allocated_gpu",
            "resolved",
            "GPU-a0",
            "node-a",
            "train-1",
            "vision",
            "detector",
            at(0),
            at(15),
            900.0,
            0.6,
            "GPU-a0 busy again",
        ],
        [
            "budget_burn",
            "firing",
            "",
            "",
            "",
            "research",
            "notebooks",
            at(30),
            at(31),
            0.0,
            0.0,
            "research/notebooks will exceed its November budget",
        ],
        # A second budget rule of the same team fires too (migration 020's `rule`).
        ["budget_burn", "firing", "", "", "", "research", "notebooks",
         at(40), at(41), 0.0, 0.0, "research/notebooks spent 80% of its November budget"],
    ]  # fmt: skip


# The rule of each alert row above.
ALERT_RULES = ["", "", "", "", "burn_rate", "mtd_80"]


ALERT_COLUMNS = [
    "kind", "state", "gpu_uuid", "node", "job_id", "team", "project",
    "since", "ts", "idle_seconds", "wasted_usd", "message",
]  # fmt: skip


def seed(client: Any) -> None:
    """Migrate the store and insert the fleet above."""
    from gpuledger.schema.migrate import migrate

    migrate(client)
    client.insert("gpuledger.cost_facts", fact_rows(), column_names=FACT_COLUMNS)
    client.insert(
        "gpuledger.jobs",
        job_rows(),
        column_names=[
            "job_id", "state", "team", "project", "job_type", "experiment_id", "gpu_uuids",
            "started_at", "ended_at", "labels", "updated_at",
        ],
    )  # fmt: skip
    client.insert(
        "gpuledger.usage", usage_rows(), column_names=["ts", "job_id", "requests", "tokens"]
    )
    rows = [[*row, rule] for row, rule in zip(alert_rows(), ALERT_RULES, strict=True)]
    client.insert("gpuledger.alerts", rows, column_names=[*ALERT_COLUMNS, "rule"])
