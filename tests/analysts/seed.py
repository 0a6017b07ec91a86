"""A small fleet's two weeks, written straight into the store, with answers computed by hand.

Every fact row covers one whole hour (duration_s = 3600) at the start of that hour, so one
row is one GPU-hour and its cost is the hourly rate: the expected answers in the tests are
sums a reader can check on paper. Prices are the round rates of `TEST_PRICES`.

The fleet (T0 = Monday 2026-11-02 00:00 UTC, all on provider `acme`, region `r1`):

| job | team / project | what | GPU | hours | util | cost |
| --- | --- | --- | --- | --- | --- | --- |
| train-a1 | vision/detector | training, exp-1, checkpoints | H100-0 | 0-4 | 0.2/.1 | 5 x 4 = 20 |
| train-a2 | vision/detector | training, no experiment | H100-1, -2 | 24-25 | 0.9/.45 | 4 x 4 = 16 |
| train-a3 | vision/detector | training, exp-3, production | H100-0 | 192-194 | .5/.4 | 3 x 4 = 12 |
| train-b1 | nlp/llm | training, exp-2, on spot | A100-0 | 6-8 | 0.6 | 3 x 0.8 = 2.4 |
| nb-m1 | nlp/llm | notebook, exp-2, 1g.5gb | MIG-a100-1 | 2-3 | NULL | 2 x 2/7 |
| infer-e1 | nlp/chat | inference endpoint | L4-0 | 0-47 | 0.5 or 0 | 48 x 0.5 = 24 |
| infer-e2 | vision/detector-api | inference endpoint | L4-1 | 34-37 | 0.3 | 4 x 0.5 = 2 |
| (none) | unallocated | | H100-3 | 0-1 | 0.0 | 2 x 4 = 8 |
| (none) | unpriced HL-225 on n4 | | GPU-hl-0 | 2 | 0.4 | 0 (price missing) |

Hours count from T0; "production" is train-a3's `purpose` label. The H100s have GPM: their
rows carry an SM activity (`sm_active`: util/SM above); the A100 and L4 rows have none.
train-a1's hour T0+4 h was first written unallocated, then cancelled (sign -1) and restated
to train-a1 (sign +1), as the worker does when a job event arrives late.
infer-e1 served 1,000 requests in each of hours 0-11 and 24-29 (18 busy hours, 30 idle);
infer-e2 served 125 requests in each of its 4 hours.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from clickhouse_connect.driver.client import Client

from gpuledger.schema.messages import PriceEntry, PricingModel

T0 = datetime(2026, 11, 2, tzinfo=UTC)
HOUR = timedelta(hours=1)
DAY = timedelta(days=1)
GB = 10**9

PROVIDER = "acme"
REGION = "r1"

# usd per GPU-hour on acme/r1; A100-40GB has 7 MIG slices, so 1g.5gb costs 2/7 an hour.
TEST_RATES: dict[tuple[str, str], float] = {
    ("H100", "on_demand"): 4.0,
    ("H100", "spot"): 1.5,
    ("H100", "reserved"): 2.5,
    ("A100-40GB", "on_demand"): 2.0,
    ("A100-40GB", "spot"): 0.8,
    ("L4", "on_demand"): 0.5,
    ("L4", "spot"): 0.25,
    ("L4", "reserved"): 0.3,
    ("T4", "on_demand"): 0.25,
}
TEST_PRICES = [
    PriceEntry(
        provider=PROVIDER,
        region=REGION,
        gpu_model=model,
        pricing_model=PricingModel(pricing),
        usd_per_gpu_hour=rate,
        effective_from=0.0,
    )
    for (model, pricing), rate in TEST_RATES.items()
]

FACT_COLUMNS = (
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
    "sm_active",
    "model",
    "environment",
)


@dataclass(frozen=True)
class Job:
    job_id: str
    state: str
    team: str
    project: str
    job_type: str
    experiment_id: str
    gpu_uuids: list[str]
    started_at: datetime
    ended_at: datetime | None
    labels: dict[str, str] = field(default_factory=dict)


JOBS = [
    Job("train-a1", "succeeded", "vision", "detector", "training", "exp-1", ["H100-0"],
        T0, T0 + 5 * HOUR, {"checkpoint": "true"}),
    Job("train-a2", "succeeded", "vision", "detector", "training", "", ["H100-1", "H100-2"],
        T0 + DAY, T0 + DAY + 2 * HOUR),
    Job("train-a3", "succeeded", "vision", "detector", "training", "exp-3", ["H100-0"],
        T0 + 8 * DAY, T0 + 8 * DAY + 3 * HOUR, {"purpose": "production"}),
    Job("train-b1", "failed", "nlp", "llm", "training", "exp-2", ["A100-0"],
        T0 + 6 * HOUR, T0 + 9 * HOUR),
    Job("nb-m1", "cancelled", "nlp", "llm", "notebook", "exp-2", ["MIG-a100-1"],
        T0 + 2 * HOUR, T0 + 4 * HOUR),
    Job("infer-e1", "running", "nlp", "chat", "inference", "", ["L4-0"], T0, None),
    Job("infer-e2", "succeeded", "vision", "detector-api", "inference", "", ["L4-1"],
        T0 + DAY + 10 * HOUR, T0 + DAY + 14 * HOUR),
]  # fmt: skip
JOB_BY_ID = {job.job_id: job for job in JOBS}
# (model, environment) tags of the jobs, in their job events and so in their facts
TAGS = {
    "train-a1": ("yolo-v9", "research"),
    "train-a2": ("yolo-v9", "prod"),
    "train-a3": ("yolo-v9", "prod"),
    "train-b1": ("llama-3-8b", "research"),
    "nb-m1": ("", "dev"),
    "infer-e1": ("llama-3-8b-chat", "prod"),
    "infer-e2": ("yolo-v9", "prod"),
}

NODE_OF = {"H100": "n1", "A100-40GB": "n2", "L4": "n3"}


def fact(
    ts: datetime,
    gpu_uuid: str,
    gpu_model: str,
    job: Job | None,
    *,
    util: float | None,
    mem_gb: float,
    pricing_model: str = "on_demand",
    mig_profile: str = "",
    sign: int = 1,
    sm: float | None = None,
) -> dict[str, Any]:
    rate = TEST_RATES[(gpu_model, pricing_model)]
    if mig_profile:
        rate *= int(mig_profile.split("g.")[0]) / 7
    cost = rate  # one GPU-hour
    allocated = job is not None
    return {
        "ts": ts,
        "sign": sign,
        "node": NODE_OF[gpu_model],
        "gpu_uuid": gpu_uuid,
        "gpu_model": gpu_model,
        "mig_profile": mig_profile,
        "job_id": job.job_id if job else "",
        "team": job.team if job else "",
        "project": job.project if job else "",
        "job_type": job.job_type if job else "",
        "experiment_id": job.experiment_id if job else "",
        "provider": PROVIDER,
        "region": REGION,
        "pricing_model": pricing_model,
        "duration_s": 3600.0,
        "share": 1.0,
        "util_sm": util,
        "mem_used_bytes": int(mem_gb * GB),
        "power_w": 100.0,
        "usd_per_gpu_hour": rate,
        "cost_usd": cost,
        "idle_cost_usd": 0.0 if util is None else cost * (1 - util),
        "allocated": int(allocated),
        "idle": int(allocated and util is not None and util < 0.05),
        "price_missing": 0,
        "sm_active": sm,
        "model": TAGS.get(job.job_id, ("", ""))[0] if job else "",
        "environment": TAGS.get(job.job_id, ("", ""))[1] if job else "",
    }


E1_BUSY_HOURS = [*range(0, 12), *range(24, 30)]


def facts() -> list[dict[str, Any]]:
    j = JOB_BY_ID
    rows: list[dict[str, Any]] = []
    for h in range(4):
        rows.append(
            fact(T0 + h * HOUR, "H100-0", "H100", j["train-a1"], util=0.2, mem_gb=8, sm=0.1)
        )
    # Hour 4: written unallocated, then cancelled and restated to train-a1.
    late = T0 + 4 * HOUR
    rows.append(fact(late, "H100-0", "H100", None, util=0.2, mem_gb=8, sm=0.1))
    rows.append(fact(late, "H100-0", "H100", None, util=0.2, mem_gb=8, sign=-1, sm=0.1))
    rows.append(fact(late, "H100-0", "H100", j["train-a1"], util=0.2, mem_gb=8, sm=0.1))
    for gpu in ("H100-1", "H100-2"):
        for h in (24, 25):
            rows.append(
                fact(T0 + h * HOUR, gpu, "H100", j["train-a2"], util=0.9, mem_gb=70, sm=0.45)
            )
    for h in (192, 193, 194):
        rows.append(
            fact(T0 + h * HOUR, "H100-0", "H100", j["train-a3"], util=0.5, mem_gb=40, sm=0.4)
        )
    for h in (6, 7, 8):
        rows.append(
            fact(
                T0 + h * HOUR,
                "A100-0",
                "A100-40GB",
                j["train-b1"],
                util=0.6,
                mem_gb=30,
                pricing_model="spot",
            )
        )
    for h in (2, 3):
        rows.append(
            fact(
                T0 + h * HOUR,
                "MIG-a100-1",
                "A100-40GB",
                j["nb-m1"],
                util=None,
                mem_gb=2,
                mig_profile="1g.5gb",
            )
        )
    for h in range(48):
        util = 0.5 if h in E1_BUSY_HOURS else 0.0
        rows.append(fact(T0 + h * HOUR, "L4-0", "L4", j["infer-e1"], util=util, mem_gb=10))
    for h in (34, 35, 36, 37):
        rows.append(fact(T0 + h * HOUR, "L4-1", "L4", j["infer-e2"], util=0.3, mem_gb=6))
    for h in (0, 1):
        rows.append(fact(T0 + h * HOUR, "H100-3", "H100", None, util=0.0, mem_gb=0, sm=0.0))
    unpriced = fact(T0 + 2 * HOUR, "GPU-hl-0", "H100", None, util=0.4, mem_gb=1)
    unpriced.update(
        node="n4",
        gpu_model="HL-225",
        provider="*",
        region="*",
        usd_per_gpu_hour=0.0,
        cost_usd=0.0,
        idle_cost_usd=0.0,
        price_missing=1,
    )
    rows.append(unpriced)
    return rows


def usage() -> list[tuple[datetime, str, int, int]]:
    rows = [
        (T0 + h * HOUR + timedelta(minutes=30), "infer-e1", 1000, 50_000) for h in E1_BUSY_HOURS
    ]
    rows += [(T0 + h * HOUR + timedelta(minutes=5), "infer-e2", 125, 10_000) for h in range(34, 38)]
    return rows


def insert_facts(client: Client, rows: list[dict[str, Any]]) -> None:
    client.insert(
        "gpuledger.cost_facts",
        [[row[c] for c in FACT_COLUMNS] for row in rows],
        column_names=list(FACT_COLUMNS),
    )


def insert_jobs(client: Client, jobs: list[Job], updated: datetime = T0 + 14 * DAY) -> None:
    client.insert(
        "gpuledger.jobs",
        [
            [
                job.job_id,
                job.state,
                job.team,
                job.project,
                job.job_type,
                job.experiment_id,
                *TAGS.get(job.job_id, ("", "")),
                job.gpu_uuids,
                job.started_at,
                job.ended_at,
                job.labels,
                updated,
            ]
            for job in jobs
        ],
        column_names=[
            "job_id",
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
            "labels",
            "updated_at",
        ],
    )


def seed(client: Client) -> None:
    """Write the fleet above into a migrated store."""
    insert_facts(client, facts())
    insert_jobs(client, JOBS)
    client.insert(
        "gpuledger.usage",
        [list(row) for row in usage()],
        column_names=["ts", "job_id", "requests", "tokens"],
    )
    client.insert(
        "gpuledger.prices",
        [
            [
                p.provider,
                p.region,
                p.gpu_model,
                p.pricing_model.value,
                p.usd_per_gpu_hour,
                datetime.fromtimestamp(p.effective_from, UTC),
                "test book",
                T0,
            ]
            for p in TEST_PRICES
        ],
        column_names=[
            "provider",
            "region",
            "gpu_model",
            "pricing_model",
            "usd_per_gpu_hour",
            "effective_from",
            "source",
            "loaded_at",
        ],
    )
