"""The cluster rewrite of migration statements (`gpuledger.schema.cluster`), statement by
statement. That every rewritten statement parses, and that the layout answers as one server
does, is tested against the real engine in tests/integration/test_cluster_schema.py."""

from __future__ import annotations

import pytest

from gpuledger.schema.cluster import (
    SHARDED,
    ClusterError,
    check_cluster_name,
    on_cluster,
    split_clauses,
)
from gpuledger.schema.migrate import available, script, statements_for, views


def test_a_sharded_table_is_a_replicated_local_table_under_a_distributed_one() -> None:
    local, distributed = on_cluster(
        "CREATE TABLE IF NOT EXISTS gpuledger.cost_facts (ts DateTime, gpu_uuid String)\n"
        "ENGINE = MergeTree ORDER BY ts SETTINGS non_replicated_deduplication_window = 10000",
        "two",
    )
    assert local.startswith(
        "CREATE TABLE IF NOT EXISTS gpuledger.cost_facts_local ON CLUSTER 'two' ("
    )
    assert (
        "ENGINE = ReplicatedMergeTree('/clickhouse/tables/{shard}/gpuledger/cost_facts_local', "
        "'{replica}')" in local
    )
    assert "SETTINGS replicated_deduplication_window = 10000" in local
    assert distributed == (
        "CREATE TABLE IF NOT EXISTS gpuledger.cost_facts ON CLUSTER 'two' AS "
        "gpuledger.cost_facts_local ENGINE = Distributed('two', 'gpuledger', "
        "'cost_facts_local', cityHash64(gpu_uuid))"
    )


def test_a_small_table_has_one_replica_on_every_server_and_keeps_its_engine_arguments() -> None:
    (statement,) = on_cluster(
        "CREATE TABLE IF NOT EXISTS gpuledger.jobs (job_id String, updated_at DateTime)\n"
        "ENGINE = ReplacingMergeTree(updated_at)\nORDER BY job_id",
        "c",
    )
    assert statement.startswith("CREATE TABLE IF NOT EXISTS gpuledger.jobs ON CLUSTER 'c' (")
    assert (
        "ENGINE = ReplicatedReplacingMergeTree('/clickhouse/tables/all/gpuledger/jobs', "
        "'{replica}', updated_at)" in statement
    )


def test_materialized_views_read_and_write_the_shards_local_tables() -> None:
    (statement,) = on_cluster(
        "CREATE MATERIALIZED VIEW IF NOT EXISTS gpuledger.cost_hour_mv TO gpuledger.cost_hour AS\n"
        "SELECT f.job_id AS job_id, j.team AS team FROM gpuledger.cost_facts AS f "
        "JOIN gpuledger.jobs AS j USING job_id",
        "c",
    )
    assert "gpuledger.cost_hour_mv ON CLUSTER 'c' TO gpuledger.cost_hour_local AS" in statement
    assert "FROM gpuledger.cost_facts_local AS f" in statement
    assert "JOIN gpuledger.jobs AS j" in statement  # not sharded: the same name everywhere
    (modify,) = on_cluster(
        "ALTER TABLE gpuledger.cost_hour_mv MODIFY QUERY SELECT 1 FROM gpuledger.cost_facts",
        "c",
    )
    assert modify == (
        "ALTER TABLE gpuledger.cost_hour_mv ON CLUSTER 'c' MODIFY QUERY SELECT 1 FROM "
        "gpuledger.cost_facts_local"
    )


def test_an_alter_of_a_sharded_table_gives_the_distributed_table_only_its_column_clauses() -> None:
    local, distributed = on_cluster(
        "ALTER TABLE gpuledger.cost_job_gpu_hour\n"
        "    ADD COLUMN IF NOT EXISTS model LowCardinality(String) AFTER allocated,\n"
        "    MODIFY ORDER BY (hour, job_id, model)",
        "c",
    )
    assert local.startswith("ALTER TABLE gpuledger.cost_job_gpu_hour_local ON CLUSTER 'c' ")
    assert "MODIFY ORDER BY (hour, job_id, model)" in local
    assert distributed == (
        "ALTER TABLE gpuledger.cost_job_gpu_hour ON CLUSTER 'c' "
        "ADD COLUMN IF NOT EXISTS model LowCardinality(String) AFTER allocated"
    )
    # A clause's text is kept as written, string literals and all.
    (_, spaced) = on_cluster(
        "ALTER TABLE gpuledger.usage ADD COLUMN IF NOT EXISTS s String DEFAULT 'a,  b'", "c"
    )
    assert spaced.endswith("DEFAULT 'a,  b'")
    (index_only,) = on_cluster(
        "ALTER TABLE gpuledger.samples_raw ADD INDEX IF NOT EXISTS i ts TYPE minmax GRANULARITY 1",
        "c",
    )
    assert index_only.startswith("ALTER TABLE gpuledger.samples_raw_local ON CLUSTER 'c' ")


def test_a_backfill_goes_through_the_distributed_tables_and_waits_for_every_shard() -> None:
    (statement,) = on_cluster(
        "INSERT INTO gpuledger.cost_job_gpu_hour\nSELECT x.hour FROM gpuledger.cost_facts AS x",
        "c",
    )
    assert statement == (
        "INSERT INTO gpuledger.cost_job_gpu_hour SETTINGS distributed_foreground_insert = 1 "
        "SELECT x.hour FROM gpuledger.cost_facts AS x"
    )


def test_views_and_the_database_are_created_on_every_server() -> None:
    assert on_cluster("CREATE DATABASE IF NOT EXISTS gpuledger", "c") == [
        "CREATE DATABASE IF NOT EXISTS gpuledger ON CLUSTER 'c'"
    ]
    (view,) = on_cluster("CREATE OR REPLACE VIEW gpuledger.v AS SELECT 1", "c")
    assert view == "CREATE OR REPLACE VIEW gpuledger.v ON CLUSTER 'c' AS SELECT 1"


@pytest.mark.parametrize(
    "statement",
    [
        "DROP TABLE gpuledger.cost_facts",
        "CREATE TABLE IF NOT EXISTS gpuledger.x (a UInt8) ENGINE = Memory",
        "OPTIMIZE TABLE gpuledger.cost_facts FINAL",
    ],
)
def test_a_statement_no_rule_knows_is_refused_not_half_translated(statement: str) -> None:
    with pytest.raises(ClusterError):
        on_cluster(statement, "c")


@pytest.mark.parametrize("name", ["", "a b", "x'y", "-lead", "c" * 129])
def test_a_cluster_name_clickhouse_cannot_take_is_refused(name: str) -> None:
    with pytest.raises(ClusterError, match="cluster name"):
        check_cluster_name(name)


def test_alter_clauses_split_at_top_level_commas_only() -> None:
    assert split_clauses(
        "ADD COLUMN a Map(String, UInt8) DEFAULT map('x,y', 1), DROP COLUMN b"
    ) == [
        "ADD COLUMN a Map(String, UInt8) DEFAULT map('x,y', 1)",
        "DROP COLUMN b",
    ]


def test_every_shipped_statement_has_a_cluster_rule_and_every_sharded_table_exists() -> None:
    created: set[str] = set()
    for migration in available():
        for statement in statements_for(migration.sql, "c"):
            if statement.startswith("CREATE TABLE IF NOT EXISTS gpuledger."):
                created.add(statement.split()[5].removeprefix("gpuledger."))
    for view in views():
        statements_for(view.sql, "c")
    assert {f"{name}_local" for name in SHARDED} <= created
    assert set(SHARDED) <= created


def test_the_printed_script_is_every_statement_once_with_its_file() -> None:
    text = script(cluster="c")
    assert "-- 001_cost_facts.sql" in text and "-- views/job_costs.sql" in text
    statements = [s for m in available() for s in statements_for(m.sql, "c")]
    statements += [s for v in views() for s in statements_for(v.sql, "c")]
    assert all(f"{s};" in text for s in statements)
    # Every DDL statement runs on every server; a backfill once, through the Distributed tables.
    ddl = [s for s in statements if not s.startswith("INSERT")]
    assert text.count("ON CLUSTER 'c'") == len(ddl) and len(ddl) < len(statements)
    assert "ON CLUSTER" not in script()
