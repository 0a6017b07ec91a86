"""The schema on a ClickHouse cluster: each migration statement rewritten for `ON CLUSTER`.

`db migrate --cluster NAME` runs these rewrites instead of the statements as written, on any
one server of the cluster; ClickHouse's distributed DDL (which needs Keeper) runs them on all.

The layout (docs/ARCHITECTURE.md §5, docs/SCALING.md):

- **Sharded tables** (`SHARDED`: the facts, the raw samples, the rollups, usage) are created
  as `NAME_local`, a `Replicated*MergeTree` per shard (Keeper path `/clickhouse/tables/{shard}/
  gpuledger/NAME_local`), with a `Distributed` table under the plain name over them. Readers,
  the views and the worker use the plain name, so no query changes. The sharding key puts all
  of a GPU's facts and raw samples on one shard whichever worker writes them (Kafka may move a
  partition to a worker that talks to another server), so a correction's read of one GPU's
  rows is answered by one shard (`optimize_skip_unused_shards`).
- **Materialized views** read and write the local tables: each shard rolls up its own facts.
- **Every other table** (jobs, prices, nodes, alerts, dead letters, the migration ledger, …:
  small, joined by the views) is one `Replicated*MergeTree` with a replica on every server
  of the cluster (Keeper path without `{shard}`), under its plain name.
- **Views** are created on every server, reading the `Distributed` tables.

Each server needs the `{shard}` and `{replica}` macros (the replica name unique in the whole
cluster) and Keeper: `deploy/clickhouse/cluster/` has a two-shard example.

Pure: statements in, statements out. A statement of a kind this module does not know is
refused, so that a new migration cannot reach a cluster half-translated.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from gpuledger.schema.sqltext import split_commas

DATABASE = "gpuledger"

# The tables whose rows are spread over the shards, and the key that spreads them.
SHARDED: dict[str, str] = {
    **dict.fromkeys(("cost_facts", "samples_raw", "cost_job_gpu_hour"), "cityHash64(gpu_uuid)"),
    **dict.fromkeys(("cost_minute", "cost_hour", "usage"), "cityHash64(job_id)"),
}
LOCAL_SUFFIX = "_local"
# What a session of a worker writing to the cluster sets: an insert returns when every shard
# has its rows (a correction reads them back at once), and a read of one GPU's rows goes to
# the shard that holds them.
CLIENT_SETTINGS: dict[str, int] = {
    "distributed_foreground_insert": 1,
    "optimize_skip_unused_shards": 1,
}

_CLUSTER_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_NAME = rf"{DATABASE}\.([a-z0-9_]+)"
_CREATE_DATABASE = re.compile(rf"^CREATE DATABASE IF NOT EXISTS {DATABASE}$")
_CREATE_TABLE = re.compile(rf"^CREATE TABLE IF NOT EXISTS {_NAME}(\s*\()", re.DOTALL)
_CREATE_MV = re.compile(rf"^CREATE MATERIALIZED VIEW IF NOT EXISTS {_NAME}(\s+TO\s)", re.DOTALL)
_CREATE_VIEW = re.compile(rf"^CREATE OR REPLACE VIEW {_NAME}(\s+AS\s)", re.DOTALL)
_ALTER = re.compile(rf"^ALTER TABLE {_NAME}\s+(.*)$", re.DOTALL)
_INSERT = re.compile(rf"^INSERT INTO {_NAME}(\s*\([^)]*\))?\s+(SELECT\s.*)$", re.DOTALL)
_ENGINE = re.compile(r"\bENGINE\s*=\s*(\w*MergeTree)\b(?:\s*\(([^()]*)\))?")
# The clauses of an ALTER that a Distributed table takes too: its columns follow the shards'.
_COLUMN_CLAUSE = re.compile(r"^(ADD|DROP|MODIFY|RENAME|COMMENT) COLUMN\b")


class ClusterError(ValueError):
    """A cluster name or a statement this module cannot put on a cluster."""


def check_cluster_name(name: str) -> str:
    """The name, if ClickHouse can take it as a cluster's name in `ON CLUSTER` and
    `Distributed(...)`: letters, digits, `_`, `.` and `-`."""
    if not _CLUSTER_NAME.match(name):
        raise ClusterError(
            f"cluster name {name!r} is not a name from the servers' remote_servers "
            "(letters, digits, _ . and -, at most 128)"
        )
    return name


def on_cluster(statement: str, cluster: str) -> list[str]:
    """The statements that do on `cluster` what `statement` does on one server."""
    check_cluster_name(cluster)
    on = f"ON CLUSTER '{cluster}'"
    text = statement.strip()
    if _CREATE_DATABASE.match(text):
        return [f"{text} {on}"]
    if match := _CREATE_TABLE.match(text):
        return _create_table(text, match, cluster, on)
    if match := _CREATE_MV.match(text):
        body = _local_names(text[match.end(1) :])
        return [f"CREATE MATERIALIZED VIEW IF NOT EXISTS {DATABASE}.{match[1]} {on}{body}"]
    if match := _CREATE_VIEW.match(text):
        return [f"CREATE OR REPLACE VIEW {DATABASE}.{match[1]} {on}{text[match.end(1) :]}"]
    if match := _ALTER.match(text):
        return _alter(match[1], match[2], on)
    if match := _INSERT.match(text):
        # Through the Distributed tables: read from every shard, each row written to the
        # shard its key names; done when every shard has its rows.
        columns = match[2] or ""
        return [
            f"INSERT INTO {DATABASE}.{match[1]}{columns} "
            f"SETTINGS distributed_foreground_insert = 1 {match[3]}"
        ]
    raise ClusterError(
        f"no rule puts this statement on a cluster: {' '.join(text.split())[:120]}…; "
        "schema/cluster.py says which kinds of statement it knows"
    )


def on_cluster_all(statements: Iterable[str], cluster: str) -> list[str]:
    """`on_cluster` of each statement, in order."""
    return [out for statement in statements for out in on_cluster(statement, cluster)]


def _create_table(text: str, match: re.Match[str], cluster: str, on: str) -> list[str]:
    name = match[1]
    rest = text[match.start(2) :]
    if name not in SHARDED:
        path = f"/clickhouse/tables/all/{DATABASE}/{name}"
        return [f"CREATE TABLE IF NOT EXISTS {DATABASE}.{name} {on}{_replicated(rest, path)}"]
    local = name + LOCAL_SUFFIX
    path = f"/clickhouse/tables/{{shard}}/{DATABASE}/{local}"
    return [
        f"CREATE TABLE IF NOT EXISTS {DATABASE}.{local} {on}{_replicated(rest, path)}",
        f"CREATE TABLE IF NOT EXISTS {DATABASE}.{name} {on} AS {DATABASE}.{local} "
        f"ENGINE = Distributed('{cluster}', '{DATABASE}', '{local}', {SHARDED[name]})",
    ]


def _replicated(definition: str, path: str) -> str:
    """The table definition with its MergeTree engine replicated at Keeper `path`."""

    def engine(match: re.Match[str]) -> str:
        args = [f"'{path}'", "'{replica}'"]
        if match[2] and match[2].strip():
            args.append(match[2].strip())
        return f"ENGINE = Replicated{match[1]}({', '.join(args)})"

    replicated, count = _ENGINE.subn(engine, definition, count=1)
    if count != 1:
        raise ClusterError(f"a table without a MergeTree engine: {definition[:80]}…")
    # A replicated table deduplicates inserts by its own window setting.
    return replicated.replace(
        "non_replicated_deduplication_window", "replicated_deduplication_window"
    )


def _alter(name: str, clauses: str, on: str) -> list[str]:
    if name not in SHARDED:
        # A replicated table or a materialized view (whose query reads the local tables).
        return [f"ALTER TABLE {DATABASE}.{name} {on} {_local_names(clauses)}"]
    out = [f"ALTER TABLE {DATABASE}.{name}{LOCAL_SUFFIX} {on} {clauses}"]
    columns = [c for c in split_clauses(clauses) if _COLUMN_CLAUSE.match(c)]
    if columns:
        out.append(f"ALTER TABLE {DATABASE}.{name} {on} {', '.join(columns)}")
    return out


def _local_names(sql: str) -> str:
    """`sql` reading and writing the shards' local tables instead of the Distributed ones."""
    return re.sub(
        rf"\b{DATABASE}\.([a-z0-9_]+)\b",
        lambda m: m[0] + LOCAL_SUFFIX if m[1] in SHARDED else m[0],
        sql,
    )


def split_clauses(clauses: str) -> list[str]:
    """An ALTER's comma-separated clauses (commas inside parentheses or quotes kept)."""
    return [p.strip() for p in split_commas(clauses)[0] if p.strip()]
