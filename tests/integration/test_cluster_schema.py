"""The schema on a ClickHouse cluster (`db migrate --cluster`), against the real engine.

No cluster of servers runs here (no Keeper, no second server). What runs instead:

- every statement of the cluster mode is parsed by ClickHouse's own parser (`formatQuery`);
- the cluster layout itself (Distributed tables over local ones, materialized views on the
  local tables, views over the Distributed tables) runs on a one-shard cluster of the embedded
  store (tests/fixtures/cluster.py), with `ON CLUSTER` and replication left out;
- a worker configured for the cluster writes there and corrects what it wrote.

docs/SQL.md's answers on the cluster layout are checked in tests/analysts/test_sql_doc.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gpuledger.broker import EmbeddedBroker
from gpuledger.schema.cluster import CLIENT_SETTINGS, SHARDED
from gpuledger.schema.messages import JobEvent, JobState, PriceEntry, PricingModel
from gpuledger.schema.migrate import MigrationError, available, migrate, statements_for, views
from gpuledger.store import connect, ensure_store, stop_owned_stores
from tests.fixtures.cluster import CLUSTER, OneShardCluster, make_cluster_folder
from tests.support import (
    Sender,
    WorkerProcess,
    batch,
    env_for,
    gpu_sample,
    rows,
    sample_record,
    scalar,
    wait_until,
)

pytestmark = pytest.mark.integration

T0 = 1_767_225_600.0


@pytest.fixture(scope="module")
def cluster_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    path = make_cluster_folder(tmp_path_factory.mktemp("cluster") / "store")
    ensure_store(path)
    url = f"chdb://{path.resolve()}"
    client = connect(url, start=False)
    migrate(OneShardCluster(client), cluster=CLUSTER)
    client.close()
    yield url
    stop_owned_stores(path)


@pytest.fixture
def ch(cluster_store: str) -> Iterator[Any]:
    client = connect(cluster_store, start=False, settings=dict(CLIENT_SETTINGS))
    yield client
    client.close()


def test_every_cluster_statement_parses(ch: Any) -> None:
    statements = [s for m in available() for s in statements_for(m.sql, "two-shards")]
    statements += [s for v in views() for s in statements_for(v.sql, "two-shards")]
    for statement in statements:
        canonical = scalar(ch, "SELECT formatQuery({q:String})", q=statement)
        assert canonical, statement
    assert len(statements) > 60


def test_sharded_tables_are_distributed_over_local_ones_and_the_rest_stay_whole(ch: Any) -> None:
    engines = dict(rows(ch, "SELECT name, engine FROM system.tables WHERE database = 'gpuledger'"))
    for name in SHARDED:
        assert engines[name] == "Distributed", name
        assert engines[f"{name}_local"].endswith("MergeTree"), name
    for name in ("jobs", "prices", "nodes", "alerts", "schema_migrations", "gpu_partitions"):
        assert engines[name].endswith("MergeTree"), name
        assert f"{name}_local" not in engines
    targets = dict(
        rows(
            ch,
            "SELECT name, arrayStringConcat(dependencies_table, ',') FROM system.tables "
            "WHERE database = 'gpuledger' AND name IN ('cost_facts_local', 'cost_facts')",
        )
    )
    # The rollups' views hang on the local facts, where each shard's inserts land.
    assert set(targets["cost_facts_local"].split(",")) == {
        "cost_minute_mv",
        "cost_hour_mv",
        "cost_job_gpu_hour_mv",
    }
    assert targets["cost_facts"] == ""


def test_migrating_again_applies_nothing_and_the_other_layout_is_refused(
    cluster_store: str,
) -> None:
    client = connect(cluster_store, start=False)
    try:
        assert migrate(OneShardCluster(client), cluster=CLUSTER) == []
        with pytest.raises(MigrationError, match="laid out for a cluster"):
            migrate(client)
    finally:
        client.close()


def test_a_one_server_store_is_not_migrated_as_a_cluster(ch: Any, tmp_path: Path) -> None:
    path = make_cluster_folder(tmp_path / "plain")
    ensure_store(path)
    client = connect(f"chdb://{path.resolve()}", start=False)
    try:
        migrate(client)
        with pytest.raises(MigrationError, match="created for one server"):
            migrate(OneShardCluster(client), cluster=CLUSTER)
    finally:
        client.close()
        stop_owned_stores(path)


def test_a_worker_on_the_cluster_costs_and_corrects_through_the_distributed_tables(
    broker: EmbeddedBroker, cluster_store: str, ch: Any, tmp_path: Path
) -> None:
    """Two minutes of one GPU, the job's start arriving after its samples were costed as
    unallocated: the correction reads the GPU's rows back through the Distributed table and
    restates them there; then a backdated price, which the store reprices there."""
    sender = Sender(broker.bootstrap)
    sender.send(
        "prices",
        "h100",
        PriceEntry(
            provider="*",
            region="*",
            gpu_model="H100",
            pricing_model=PricingModel.on_demand,
            usd_per_gpu_hour=3.6,
        ),
    )
    sender.flush()
    worker = WorkerProcess(
        env_for(broker.bootstrap, cluster_store, tmp_path, GPULEDGER_STORE_CLUSTER=CLUSTER),
        tmp_path / "worker.log",
    )
    worker.start()
    try:
        for i in range(120):
            sample = gpu_sample("GPU-cl-0", T0 + i, node="cl-node", util_sm=0.5)
            sender.send("samples", "cl-node", batch("cl-node", [sample_record(sample)]))
        sender.flush()
        wait_until(
            lambda: (
                scalar(ch, "SELECT sum(cost_usd * sign) FROM gpuledger.cost_facts")
                == pytest.approx(0.12)
            ),
            what="two minutes of unallocated facts",
        )
        sender.send(
            "jobs",
            "cl-job",
            JobEvent(
                ts=T0 + 200,
                job_id="cl-job",
                state=JobState.running,
                team="ops",
                project="cluster",
                gpu_uuids=["GPU-cl-0"],
                started_at=T0 + 60,
            ),
        )
        sender.flush()
        # From T0 + 60 the GPU is cl-job's: 60 s at $3.60/h.
        wait_until(
            lambda: (
                scalar(ch, "SELECT cost_usd FROM gpuledger.job_costs WHERE job_id = 'cl-job'")
                == pytest.approx(0.06)
            ),
            what="the correction of cl-job's minute",
        )
        # A backdated price: the store reprices the last 30 s through the Distributed
        # tables, each shard its own GPUs' facts.
        sender.send(
            "prices",
            "h100-later",
            PriceEntry(
                provider="*",
                region="*",
                gpu_model="H100",
                pricing_model=PricingModel.on_demand,
                usd_per_gpu_hour=7.2,
                effective_from=T0 + 90,
            ),
        )
        sender.flush()
        wait_until(
            lambda: (
                scalar(ch, "SELECT cost_usd FROM gpuledger.job_costs WHERE job_id = 'cl-job'")
                == pytest.approx(0.09)
            ),
            what="the repricing of cl-job's last 30 s",
        )
        # The job's team renamed: its facts take the new tag in the store, on their shard.
        sender.send("jobs", "cl-job", JobEvent(ts=T0 + 300, job_id="cl-job", team="platform"))
        sender.flush()
        wait_until(
            lambda: (
                scalar(
                    ch,
                    "SELECT sum(cost_usd * sign) FROM gpuledger.cost_facts WHERE team = 'platform'",
                )
                == pytest.approx(0.09)
            ),
            what="cl-job's facts retagged",
        )
    finally:
        worker.stop()
    unallocated = scalar(
        ch, "SELECT sum(cost_usd * sign) FROM gpuledger.cost_facts WHERE job_id = ''"
    )
    assert unallocated == pytest.approx(0.06)
    # The rows are the local table's, read whole through the Distributed one; the rollups
    # were filled on the shard by their views.
    assert scalar(ch, "SELECT count() FROM gpuledger.cost_facts_local") == scalar(
        ch, "SELECT count() FROM gpuledger.cost_facts"
    )
    assert scalar(
        ch, "SELECT sum(cost_usd) FROM gpuledger.cost_job_gpu_hour_local WHERE job_id = 'cl-job'"
    ) == pytest.approx(0.09)
    assert scalar(ch, "SELECT count() FROM gpuledger.samples_raw_local") == 120
    assert scalar(ch, "SELECT sum(sign) FROM gpuledger.cost_facts WHERE team = 'ops'") == 0


def test_a_cluster_the_server_does_not_know_is_refused_before_anything_runs(
    cluster_store: str,
) -> None:
    client = connect(cluster_store, start=False)
    try:
        with pytest.raises(MigrationError, match=r"no cluster 'elsewhere' .*: gpuledger\)"):
            migrate(OneShardCluster(client), cluster="elsewhere")
    finally:
        client.close()
