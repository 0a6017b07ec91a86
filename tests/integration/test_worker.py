"""The spine on real engines: samples, jobs and prices on the embedded broker, a real
`gpuledger worker` process, facts in the embedded ClickHouse store. Dollars are computed
by hand here, from the prices the test publishes, never read back from the code."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gpuledger.broker import EmbeddedBroker
from gpuledger.schema.messages import (
    JobEvent,
    JobState,
    JobType,
    NodeInfo,
    PriceEntry,
    PricingModel,
)
from gpuledger.schema.migrate import migrate
from gpuledger.store import connect
from tests.support import Sender, WorkerProcess, batch, env_for, rows, scalar, wait_until

pytestmark = pytest.mark.integration

T0 = 1_767_225_600.0  # 2026-01-01T00:00:00Z: event time only, the wall clock plays no part
H100 = "NVIDIA H100 80GB HBM3"
A100 = "NVIDIA A100-SXM4-80GB"

PRICES = [
    PriceEntry(
        provider="*",
        region="*",
        gpu_model="H100",
        pricing_model=PricingModel.on_demand,
        usd_per_gpu_hour=4.0,
    ),
    PriceEntry(
        provider="aws",
        region="us-east-1",
        gpu_model="H100",
        pricing_model=PricingModel.spot,
        usd_per_gpu_hour=2.0,
    ),
    PriceEntry(
        provider="*",
        region="*",
        gpu_model="A100-80GB",
        pricing_model=PricingModel.on_demand,
        usd_per_gpu_hour=3.5,
    ),
]


class Pipeline:
    def __init__(self, bootstrap: str, client: Any, worker: WorkerProcess) -> None:
        self.bootstrap = bootstrap
        self.client = client
        self.worker = worker
        self.sender = Sender(bootstrap)

    def job_cost(self, job_id: str) -> float | None:
        found = rows(
            self.client,
            "SELECT cost_usd FROM gpuledger.job_costs WHERE job_id = {j:String}",
            j=job_id,
        )
        return float(found[0][0]) if found else None


@pytest.fixture(scope="module")
def pipeline(
    broker: EmbeddedBroker, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Pipeline]:
    tmp = tmp_path_factory.mktemp("spine")
    store_url = f"chdb://{tmp / 'store'}"
    (tmp / "store").mkdir()
    client = connect(store_url)
    migrate(client)
    worker = WorkerProcess(env_for(broker.bootstrap, store_url, tmp), tmp / "worker.log")
    sender = Sender(broker.bootstrap)
    for entry in PRICES:
        sender.send("prices", entry.key, entry)
    sender.flush()
    try:
        worker.start()
        yield Pipeline(broker.bootstrap, client, worker)
    finally:
        worker.stop()


def gpu_sample(
    gpu: str,
    ts: float,
    *,
    node: str,
    name: str = H100,
    util: float | None = 0.8,
    processes: list[dict[str, Any]] | None = None,
    mig_profile: str | None = None,
) -> dict[str, Any]:
    return {
        "v": 1,
        "ts": ts,
        "node": node,
        "gpu_uuid": gpu,
        "gpu_index": 0,
        "gpu_name": name,
        "mig_profile": mig_profile,
        "interval_s": 1.0,
        "util_sm": util,
        "util_mem": 0.1 if util is not None else None,
        "mem_used_bytes": 10 * 2**30,
        "mem_total_bytes": 80 * 2**30,
        "power_w": 400.0,
        "power_limit_w": 700.0,
        "temp_c": 60.0,
        "processes": processes or [],
    }


def proc(pid: int, job_id: str, util: float | None, mem_gib: int, team: str) -> dict[str, Any]:
    return {
        "pid": pid,
        "name": "python",
        "util_sm": util,
        "mem_used_bytes": mem_gib * 2**30,
        "labels": {"job_id": job_id, "team": team, "project": f"{team}-proj"},
    }


def test_job_costs_match_hand_computed_dollars(pipeline: Pipeline) -> None:
    """Explicit allocation on a spot node, and a GPU shared by two labelled processes."""
    s = pipeline.sender
    t0 = T0
    s.send(
        "nodes",
        "spot-node",
        NodeInfo(
            ts=t0,
            node="spot-node",
            provider="aws",
            region="us-east-1",
            pricing_model=PricingModel.spot,
        ),
    )
    s.send(
        "jobs",
        "train-1",
        JobEvent(
            ts=t0,
            job_id="train-1",
            state=JobState.running,
            team="vision",
            project="detector",
            job_type=JobType.training,
            gpu_uuids=["GPU-spine-a"],
            started_at=t0,
        ),
    )
    s.flush()
    for i in range(60):
        ts = t0 + i
        s.send(
            "samples",
            "spot-node",
            batch("spot-node", [gpu_sample("GPU-spine-a", ts, node="spot-node")]),
        )
        shared = gpu_sample(
            "GPU-spine-b",
            ts,
            node="plain-node",
            util=0.8,
            processes=[proc(11, "share-b", 0.3, 8, "nlp"), proc(12, "share-c", 0.5, 8, "speech")],
        )
        s.send("samples", "plain-node", batch("plain-node", [shared]))
    s.flush()

    # spot-node is aws/us-east-1/spot: 60 s of H100 at $2.00/h.
    expected_train = 2.0 * 60 / 3600
    # plain-node has no NodeInfo: */*/on_demand $4.00/h, split by process util over GPU util.
    expected_b = 4.0 * 60 / 3600 * (0.3 / 0.8)
    expected_c = 4.0 * 60 / 3600 * (0.5 / 0.8)
    wait_until(
        lambda: (
            (pipeline.job_cost("train-1") or 0) >= expected_train - 1e-9
            and (pipeline.job_cost("share-c") or 0) >= expected_c - 1e-9
        ),
        what="the facts of train-1 and share-c",
    )
    assert pipeline.job_cost("train-1") == pytest.approx(expected_train, rel=1e-9)
    assert pipeline.job_cost("share-b") == pytest.approx(expected_b, rel=1e-6)
    assert pipeline.job_cost("share-c") == pytest.approx(expected_c, rel=1e-6)
    # The shared GPU's whole cost is accounted for: the two jobs plus nothing unallocated.
    total_b = scalar(
        pipeline.client,
        "SELECT sum(cost_usd * sign) FROM gpuledger.cost_facts WHERE gpu_uuid = 'GPU-spine-b'",
    )
    assert total_b == pytest.approx(4.0 * 60 / 3600, rel=1e-6)
    team = scalar(
        pipeline.client,
        "SELECT team FROM gpuledger.job_costs WHERE job_id = 'train-1'",
    )
    assert team == "vision"


def test_job_start_arriving_10s_late_still_owns_its_first_samples(pipeline: Pipeline) -> None:
    s = pipeline.sender
    t0 = T0 + 10_000
    for i in range(30):
        s.send(
            "samples",
            "late-node",
            batch("late-node", [gpu_sample("GPU-late", t0 + i, node="late-node", util=0.5)]),
        )
    s.flush()
    # The worker writes them as unallocated first (the grace is 1 s).
    wait_until(
        lambda: (
            scalar(
                pipeline.client,
                "SELECT count() FROM gpuledger.cost_facts WHERE gpu_uuid = 'GPU-late'",
            )
            >= 30
        ),
        what="the unallocated facts of GPU-late",
    )
    s.send(
        "jobs",
        "late-job",
        JobEvent(
            ts=t0 + 40,
            job_id="late-job",
            state=JobState.running,
            team="ranking",
            project="ads",
            job_type=JobType.training,
            gpu_uuids=["GPU-late"],
            started_at=t0,
        ),
    )
    s.flush()
    expected = 4.0 * 30 / 3600
    wait_until(
        lambda: abs((pipeline.job_cost("late-job") or 0) - expected) < 1e-9,
        what="late-job to own its first 30 samples",
    )
    unallocated = scalar(
        pipeline.client,
        "SELECT sum(cost_usd * sign) FROM gpuledger.cost_facts "
        "WHERE gpu_uuid = 'GPU-late' AND job_id = ''",
    )
    assert abs(unallocated) < 1e-12
    # The rollups agree with the facts after cancel and restate.
    rollup = scalar(
        pipeline.client,
        "SELECT sum(cost_usd) FROM gpuledger.cost_minute WHERE job_id = 'late-job'",
    )
    assert rollup == pytest.approx(expected, rel=1e-9)


def test_bad_messages_are_dead_lettered_and_the_worker_goes_on(pipeline: Pipeline) -> None:
    s = pipeline.sender
    t0 = T0 + 20_000
    s.send("samples", "bad-node", b"{not json")
    s.send("samples", "bad-node", {"v": 99, "node": "bad-node", "samples": []})
    good = gpu_sample("GPU-good", t0, node="bad-node")
    too_busy = gpu_sample("GPU-bad", t0, node="bad-node", util=1.7)
    s.send("samples", "bad-node", batch("bad-node", [too_busy, good]))
    s.send(
        "prices",
        "neg",
        {
            "v": 1,
            "provider": "*",
            "region": "*",
            "gpu_model": "H100",
            "pricing_model": "on_demand",
            "usd_per_gpu_hour": -3.0,
            "effective_from": 0,
        },
    )
    unknown = gpu_sample("GPU-mystery", t0, node="bad-node", name="NVIDIA Quantum Q1")
    s.send("samples", "bad-node", batch("bad-node", [unknown]))
    s.flush()

    letters = wait_until(
        lambda: (
            rows(
                pipeline.client,
                "SELECT topic, idx, error, value_b64 FROM gpuledger.deadletters ORDER BY ts",
            )
            if scalar(pipeline.client, "SELECT count() FROM gpuledger.deadletters") >= 4
            else None
        ),
        what="four dead letters",
    )
    errors = "\n".join(f"{t} {i} {e}" for t, i, e, _ in letters)
    assert "gpuledger.samples None" in errors and "Invalid JSON" in errors
    assert "v: Input should be 1" in errors
    assert "util_sm" in errors and "1.7" in errors
    assert "usd_per_gpu_hour" in errors and "-3.0" in errors
    # The bad sample's envelope carries it alone, with its index in the batch.
    bad = next(x for x in letters if x[1] == 0 and "util_sm" in x[2])
    assert json.loads(base64.b64decode(bad[3]))["gpu_uuid"] == "GPU-bad"
    # The good sample of the same batch is costed; the unknown model is visible as unpriced.
    wait_until(
        lambda: (
            scalar(
                pipeline.client,
                "SELECT count() FROM gpuledger.cost_facts "
                "WHERE gpu_uuid IN ('GPU-good', 'GPU-mystery')",
            )
            == 2
        ),
        what="the good and the unknown-model samples",
    )
    missing = rows(
        pipeline.client,
        "SELECT gpu_uuid, price_missing, cost_usd FROM gpuledger.cost_facts "
        "WHERE gpu_uuid IN ('GPU-good', 'GPU-mystery') ORDER BY gpu_uuid",
    )
    assert missing == [("GPU-good", 0, pytest.approx(4.0 / 3600)), ("GPU-mystery", 1, 0.0)]
    # The negative price never replaced the good one.
    assert pipeline.worker.proc is not None and pipeline.worker.proc.poll() is None


def test_a_sample_sent_twice_is_counted_once(pipeline: Pipeline) -> None:
    s = pipeline.sender
    t0 = T0 + 30_000
    message = batch("dup-node", [gpu_sample("GPU-dup", t0 + i, node="dup-node") for i in range(5)])
    s.send("samples", "dup-node", message)
    s.flush()
    wait_until(
        lambda: (
            scalar(
                pipeline.client,
                "SELECT count() FROM gpuledger.cost_facts WHERE gpu_uuid = 'GPU-dup'",
            )
            == 5
        ),
        what="five facts",
    )
    s.send("samples", "dup-node", message)  # an agent re-sending after a timeout
    s.send(
        "samples", "dup-node", batch("dup-node", [gpu_sample("GPU-dup", t0 + 5, node="dup-node")])
    )
    s.flush()
    wait_until(
        lambda: (
            scalar(
                pipeline.client,
                "SELECT count() FROM gpuledger.cost_facts WHERE gpu_uuid = 'GPU-dup'",
            )
            == 6
        ),
        what="the sixth fact",
    )
    total = scalar(
        pipeline.client,
        "SELECT sum(cost_usd * sign) FROM gpuledger.cost_facts WHERE gpu_uuid = 'GPU-dup'",
    )
    assert total == pytest.approx(4.0 * 6 / 3600, rel=1e-9)


def test_the_end_of_a_job_known_only_by_labels_is_recorded(pipeline: Pipeline) -> None:
    """A Kubernetes-style job: no gpu_uuids, its processes carry its id. Its final state must
    reach `jobs` (and so job_costs and the success rate), though no fact changes hands."""
    s = pipeline.sender
    t0 = T0 + 40_000
    s.send(
        "jobs",
        "lbl-1",
        JobEvent(
            ts=t0, job_id="lbl-1", state=JobState.running, team="nlp", job_type=JobType.inference
        ),
    )
    for i in range(5):
        sample = gpu_sample(
            "GPU-lbl", t0 + i, node="lbl-node", processes=[proc(7, "lbl-1", 0.8, 8, "nlp")]
        )
        s.send("samples", "lbl-node", batch("lbl-node", [sample]))
    s.flush()
    expected = 4.0 * 5 / 3600
    wait_until(lambda: (pipeline.job_cost("lbl-1") or 0) >= expected - 1e-12, what="lbl-1's facts")
    s.send(
        "jobs",
        "lbl-1",
        JobEvent(ts=t0 + 10, job_id="lbl-1", state=JobState.succeeded, ended_at=t0 + 5),
    )
    s.flush()
    state = "SELECT state FROM gpuledger.job_costs WHERE job_id = 'lbl-1'"
    wait_until(lambda: scalar(pipeline.client, state) == "succeeded", what="lbl-1 succeeded")
    assert pipeline.job_cost("lbl-1") == pytest.approx(expected, rel=1e-9)


def test_model_and_environment_tags_reach_the_facts_and_the_views(pipeline: Pipeline) -> None:
    """Two jobs on the on-demand price ($4.00/h): one tagged by its job event, one by its
    process labels only; then a later job event retags the first, and its facts follow."""
    s = pipeline.sender
    t0 = T0 + 50_000
    s.send(
        "jobs",
        "tag-train",
        JobEvent(
            ts=t0,
            job_id="tag-train",
            state=JobState.running,
            team="vision",
            model="yolo-v9",
            environment="staging",
            gpu_uuids=["GPU-tag-a"],
            started_at=t0,
        ),
    )
    s.flush()
    served = proc(21, "tag-serve", 0.6, 8, "search")
    served["labels"].update(model="ranker-v3", environment="prod")
    for i in range(30):
        s.send(
            "samples",
            "tag-node",
            batch(
                "tag-node",
                [
                    gpu_sample("GPU-tag-a", t0 + i, node="tag-node"),
                    gpu_sample("GPU-tag-b", t0 + i, node="tag-node", util=0.6, processes=[served]),
                ],
            ),
        )
    s.flush()
    thirty = 4.0 * 30 / 3600
    wait_until(
        lambda: (
            (pipeline.job_cost("tag-train") or 0) >= thirty - 1e-9
            and (pipeline.job_cost("tag-serve") or 0) >= thirty - 1e-9
        ),
        what="the tagged jobs' facts",
    )
    tags = "SELECT job_id, model, environment FROM gpuledger.job_costs WHERE job_id LIKE 'tag-%'"
    assert sorted(rows(pipeline.client, tags)) == [
        ("tag-serve", "ranker-v3", "prod"),
        ("tag-train", "yolo-v9", "staging"),
    ]
    window = "start = '2026-01-01 13:00:00', end = '2026-01-01 15:00:00'"
    per_model = rows(
        pipeline.client,
        f"SELECT model, cost_usd, jobs FROM gpuledger.model_costs({window}) ORDER BY model",
    )
    assert per_model == [
        ("ranker-v3", pytest.approx(thirty), 1),
        ("yolo-v9", pytest.approx(thirty), 1),
    ]
    # The job is moved to production: its facts are restated with the new tag.
    s.send("jobs", "tag-train", JobEvent(ts=t0 + 40, job_id="tag-train", environment="prod"))
    s.flush()
    prod = f"SELECT cost_usd FROM gpuledger.environment_costs({window}) WHERE environment = 'prod'"
    wait_until(
        lambda: abs(float((rows(pipeline.client, prod) or [(0,)])[0][0]) - 2 * thirty) < 1e-9,
        what="tag-train's facts restated to environment prod",
    )
    assert rows(
        pipeline.client,
        f"SELECT environment FROM gpuledger.environment_costs({window}) ORDER BY environment",
    ) == [("prod",)]
    facts = (
        "SELECT sum(sign) FROM gpuledger.cost_facts "
        "WHERE job_id = 'tag-train' AND environment = {e:String}"
    )
    assert scalar(pipeline.client, facts, e="staging") == 0
    assert scalar(pipeline.client, facts, e="prod") == 30


def test_a_worker_starts_on_a_machine_where_gpuledger_never_ran(
    pipeline: Pipeline, tmp_path: Path
) -> None:
    """No data folder yet (a fresh HOME, no GPULEDGER_DATA_DIR): the worker makes what it needs."""
    home = tmp_path / "home"
    home.mkdir()
    store = tmp_path / "store"
    store.mkdir()
    env = env_for(pipeline.bootstrap, f"chdb://{store}", tmp_path, HOME=str(home))
    del env["GPULEDGER_DATA_DIR"]
    env.pop("XDG_DATA_HOME", None)
    env["GPULEDGER_GROUP_ID"] = "fresh-machine"
    worker = WorkerProcess(env, tmp_path / "fresh.log")
    try:
        worker.start()
        assert (home / ".local" / "share" / "gpuledger").is_dir()
    finally:
        worker.stop()


def test_worker_log_has_no_tracebacks(pipeline: Pipeline, tmp_path: Path) -> None:
    assert "Traceback" not in pipeline.worker.log()
