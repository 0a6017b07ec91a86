"""The worker's ClickHouse edge for the cost path: its reads and writes, through
clickhouse-connect (the query texts are in streams/sql.py).

Inserts carry a deduplication token derived from their content, and the setting that
makes the materialized rollups honour it too, so a block retried after a timeout or a crash
is stored once everywhere (schema/clickhouse/README.md).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import astuple, dataclass
from types import MappingProxyType
from typing import Any

import orjson
from clickhouse_connect.driver.client import Client

from gpuledger.ledger.cost import JobRecord
from gpuledger.ledger.factrows import (
    FACT_COLUMNS,
    VALUE_COLUMNS,
    Row,
    fact_table,
    row_columns,
    stored_row,
)
from gpuledger.ledger.facts import FactBatch
from gpuledger.ledger.reprice import SINCE_START_MS, PriceKey, PriceSpan
from gpuledger.ledger.restate import Scope
from gpuledger.ledger.timekeys import to_ms
from gpuledger.schema.messages import (
    DeadLetter,
    GpuSample,
    JobState,
    JobType,
    NodeInfo,
    PriceEntry,
    UsageEvent,
)
from gpuledger.streams import sql
from gpuledger.streams.decode import SampleDecoder, sample_payloads

DB = "gpuledger"


def _token(*parts: Iterable[object]) -> str:
    digest = hashlib.sha256()
    for part in parts:
        for item in part:
            digest.update(repr(item).encode())
            digest.update(b"\x00")
    return digest.hexdigest()


def _digest(*columns: Sequence[object]) -> str:
    """A deduplication token of an insert: a digest of its key columns (same rows, same token)."""
    return hashlib.sha256(orjson.dumps(columns)).hexdigest()


def _dedup_settings(token: str) -> dict[str, Any]:
    return {
        "insert_deduplication_token": token,
        "insert_deduplicate": 1,
        "deduplicate_blocks_in_dependent_materialized_views": 1,
    }


def _ms(ts: float | None) -> int | None:
    return None if ts is None else to_ms(ts)


@dataclass
class FactSink:
    client: Client

    def __post_init__(self) -> None:
        # Bind values go in the request body: a scope's GPUs, or a batch's sample keys, can
        # outgrow what a server takes in a URL.
        self.client.form_encode_query_params = True  # type: ignore[attr-defined]

    # -- facts -----------------------------------------------------------------------
    def insert_facts(self, facts: FactBatch) -> None:
        if not facts:
            return
        named = facts.columns()
        token = _digest(named["gpu_uuid"], named["ts"], named["job_id"], named["sign"])
        self.client.insert_arrow(
            f"{DB}.cost_facts", fact_table(named), settings=_dedup_settings(token)
        )

    def insert_rows(self, cancels: Sequence[Row], restates: Sequence[Row], token: str) -> None:
        """A correction: the cancelled rows with sign -1, their replacements with +1.

        `token` is the correction's own (one per correction, kept across retries): rows alone
        would not do, since attribution going A -> B -> A -> B repeats the first rows.
        """
        if not cancels and not restates:
            return
        signed = [(-1, r) for r in cancels] + [(1, r) for r in restates]
        columns = row_columns(signed)
        self._insert_columns("cost_facts", columns, token)

    def _insert_columns(self, table: str, columns: Mapping[str, Sequence[Any]], token: str) -> None:
        self.client.insert(
            f"{DB}.{table}",
            list(columns.values()),
            column_names=list(columns),
            column_oriented=True,
            settings=_dedup_settings(token),
        )

    def insert_raw(self, samples: Sequence[GpuSample]) -> None:
        """Keep the samples costed, so that late metadata can re-cost them."""
        if not samples:
            return
        ts_ms = [to_ms(s.ts) for s in samples]
        gpus = [s.gpu_uuid for s in samples]
        self.client.insert(
            f"{DB}.samples_raw",
            [ts_ms, [s.node for s in samples], gpus, sample_payloads(samples)],
            column_names=["ts", "node", "gpu_uuid", "payload"],
            column_oriented=True,
            settings=_dedup_settings(_digest(gpus, ts_ms)),
        )

    # -- metadata tables -------------------------------------------------------------
    def upsert_jobs(self, jobs: Sequence[JobRecord]) -> None:
        """The merged state of these jobs. `updated_at` is the newest event time merged (the
        version the replacing table keeps), `field_ts` when each field was set."""
        self._insert_rows(
            "jobs",
            [
                {
                    "job_id": j.job_id,
                    "state": j.state or "",
                    "team": j.team or "",
                    "project": j.project or "",
                    "job_type": j.job_type or "",
                    "experiment_id": j.experiment_id or "",
                    "model": j.model or "",
                    "environment": j.environment or "",
                    "gpu_uuids": list(j.gpu_uuids),
                    "started_at": _ms(j.started_at),
                    "ended_at": _ms(j.ended_at),
                    "labels": dict(j.labels or {}),
                    "updated_at": _ms(j.ts),
                    "field_ts": dict(j.field_ts),
                }
                for j in jobs
            ],
        )

    def upsert_prices(self, entries: Sequence[PriceEntry], loaded_at: float) -> None:
        self._insert_rows(
            "prices",
            [
                {
                    "provider": e.provider,
                    "region": e.region,
                    "gpu_model": e.gpu_model,
                    "pricing_model": e.pricing_model.value,
                    "usd_per_gpu_hour": e.usd_per_gpu_hour,
                    "effective_from": _ms(e.effective_from),
                    "source": "prices topic",
                    "loaded_at": _ms(loaded_at),
                }
                for e in entries
            ],
        )

    def upsert_nodes(self, nodes: Sequence[NodeInfo]) -> None:
        """`nodes` keeps the latest per node (what analysts join), `node_history` them all."""
        rows = [
            {
                "node": n.node,
                "provider": n.provider,
                "region": n.region,
                "instance_type": n.instance_type,
                "pricing_model": n.pricing_model.value,
                "usd_per_gpu_hour": n.usd_per_gpu_hour,
                "ts": _ms(n.ts),
            }
            for n in nodes
        ]
        self._insert_rows("node_history", rows)
        self._insert_rows("nodes", rows)

    def _insert_rows(self, table: str, rows: Sequence[dict[str, Any]]) -> None:
        """Rows named by column (every row has the same keys, in the same order)."""
        if rows:
            names = list(rows[0])
            self.client.insert(
                f"{DB}.{table}", [list(r.values()) for r in rows], column_names=names
            )

    def insert_deadletters(self, letters: Sequence[DeadLetter]) -> None:
        if not letters:
            return
        rows = [
            [_ms(d.ts), d.topic, d.partition, d.offset, d.index, d.error, d.value_b64]
            for d in letters
        ]
        self.client.insert(
            f"{DB}.deadletters",
            rows,
            column_names=["ts", "topic", "partition", "offset", "idx", "error", "value_b64"],
            settings=_dedup_settings(_token((r[1], r[2], r[3], r[4]) for r in rows)),
        )

    def stored_deadletter_keys(
        self, letters: Sequence[DeadLetter]
    ) -> set[tuple[str, int, int, int | None]]:
        """Which of these letters are already stored: a message replayed after a crash is
        dead-lettered once."""
        if not letters:
            return set()
        found: set[tuple[str, int, int, int | None]] = set()
        by_place: dict[tuple[str, int], list[int]] = {}
        for d in letters:
            by_place.setdefault((d.topic, d.partition), []).append(d.offset)
        for (topic, partition), offsets in by_place.items():
            result = self.client.query(
                sql.STORED_DEADLETTERS,
                parameters={"t": topic, "p": partition, "lo": min(offsets), "hi": max(offsets)},
            )
            found.update((topic, partition, o, i) for o, i in result.result_rows)
        return found

    # -- usage -----------------------------------------------------------------------
    def insert_usage(self, events: Sequence[UsageEvent]) -> None:
        """Usage rows, one per event; the caller drops identities already stored."""
        if not events:
            return
        columns: dict[str, list[Any]] = {
            "ts": [to_ms(e.ts) for e in events],
            "job_id": [e.job_id for e in events],
            "source": [e.source for e in events],
            "requests": [e.requests for e in events],
            "tokens": [e.tokens for e in events],
        }
        self._insert_columns("usage", columns, _digest(*columns.values()))

    def stored_usage_keys(self, keys: Sequence[tuple[str, str, int]]) -> set[tuple[str, str, int]]:
        """Which of these usage identities (job_id, source, ts ms) are stored already."""
        if not keys:
            return set()
        result = self.client.query(
            sql.STORED_USAGE_KEYS,
            parameters={
                "j": sorted({j for j, _, _ in keys}),
                "lo": min(t for _, _, t in keys),
                "hi": max(t for _, _, t in keys),
                "k": [tuple(k) for k in keys],
            },
        )
        return {(job, source, int(ms)) for job, source, ms in result.result_rows}

    # -- which worker corrects what ----------------------------------------------------
    def upsert_gpu_partitions(self, pairs: Sequence[tuple[str, int]], seen_at: float) -> None:
        if not pairs:
            return
        self.client.insert(
            f"{DB}.gpu_partitions",
            [[gpu, partition, _ms(seen_at)] for gpu, partition in pairs],
            column_names=["gpu_uuid", "samples_partition", "seen_at"],
        )

    def load_gpu_partitions(self, gpus: Sequence[str] | None = None) -> dict[str, int]:
        """gpu_uuid -> the samples partition its samples arrive in (all, or these GPUs)."""
        query, params = sql.GPU_PARTITIONS, {}
        if gpus is not None:
            if not gpus:
                return {}
            query, params = sql.GPU_PARTITIONS_OF, {"g": sorted(set(gpus))}
        result = self.client.query(query, parameters=params)
        return {gpu: int(p) for gpu, p in result.result_rows}

    def record_progress(self, rows: Sequence[tuple[int, str, int, int]], updated_at: float) -> None:
        """(samples partition, metadata topic, its partition, next offset) corrected."""
        if not rows:
            return
        self.client.insert(
            f"{DB}.correction_progress",
            [[sp, topic, p, offset, _ms(updated_at)] for sp, topic, p, offset in rows],
            column_names=["samples_partition", "topic", "partition", "next_offset", "updated_at"],
        )

    def load_progress(self) -> dict[int, dict[tuple[str, int], int]]:
        """samples partition -> (metadata topic, partition) -> next offset corrected."""
        result = self.client.query(sql.CORRECTION_PROGRESS)
        out: dict[int, dict[tuple[str, int], int]] = {}
        for sp, topic, p, offset in result.result_rows:
            out.setdefault(int(sp), {})[(topic, int(p))] = int(offset)
        return out

    # -- state rebuilt after a restart ------------------------------------------------
    def load_jobs(self) -> list[JobRecord]:
        """The jobs as the worker last stored them, field times included."""
        result = self.client.query(sql.LOAD_JOBS)
        jobs = []
        for row in result.result_rows:
            (job_id, state, team, project, job_type, exp, gpus, start, end, labels, upd, fts,
             model, environment) = row  # fmt: skip
            jobs.append(
                JobRecord(
                    job_id=job_id,
                    state=JobState(state) if state else None,
                    team=team or None,
                    project=project or None,
                    job_type=JobType(job_type) if job_type else None,
                    experiment_id=exp or None,
                    model=model or None,
                    environment=environment or None,
                    gpu_uuids=tuple(gpus),
                    started_at=None if start is None else start / 1000,
                    ended_at=None if end is None else end / 1000,
                    labels=MappingProxyType(dict(labels)),
                    ts=upd / 1000,
                    # Rows written before field times were kept: every set field dates
                    # from the newest event (JobRecord's own rule for a missing field time).
                    field_ts=MappingProxyType(dict(fts)),
                )
            )
        return jobs

    def load_prices(self) -> list[PriceEntry]:
        result = self.client.query(sql.LOAD_PRICES)
        return [PriceEntry(**sql.PRICES.named(row)) for row in result.result_rows]

    def load_nodes(self) -> list[NodeInfo]:
        """Every NodeInfo stored (`node_history`, and `nodes` rows written before it)."""
        result = self.client.query(sql.LOAD_NODES)
        return [NodeInfo(**sql.NODES.named(row)) for row in result.result_rows]

    def newest_fact_ts(self) -> float:
        """The time of the newest fact in the store (0 when there is none)."""
        return int(self.client.query(sql.NEWEST_FACT_TS).result_rows[0][0]) / 1000

    def stored_sample_keys(self, keys: Sequence[tuple[str, float]]) -> set[tuple[str, int]]:
        """Which of these samples already have facts (samples memory cannot vouch for)."""
        if not keys:
            return set()
        gpus = sorted({g for g, _ in keys})
        lo = min(_ms(t) or 0 for _, t in keys)
        hi = max(_ms(t) or 0 for _, t in keys)
        result = self.client.query(
            sql.STORED_SAMPLE_KEYS, parameters={"g": gpus, "lo": lo, "hi": hi}
        )
        return {(gpu, ms) for gpu, ms in result.result_rows}

    # -- corrections -----------------------------------------------------------------
    def keys_in_scope(self, scope: Scope) -> list[tuple[str, int]]:
        """(gpu_uuid, ts ms) of the stored samples a scope covers."""
        where, params = sql.scope_filter(scope)
        result = self.client.query(sql.keys_in_scope(where), parameters=params)
        return [(gpu, ms) for gpu, ms in result.result_rows]

    def raw_samples(self, keys: Sequence[tuple[str, int]]) -> list[Any]:
        """The raw samples kept at these (GPU, ts ms) keys (one each, whichever copy): as
        the worker decodes a message's samples, pydantic for any the fast path refuses."""
        result = self.client.query(sql.RAW_SAMPLES, parameters=_key_params(keys))
        samples = []
        for (payload,) in result.result_rows:
            raw = payload.encode() if isinstance(payload, str) else payload
            sample = _SAMPLES.decode_sample(raw)
            samples.append(sample if sample is not None else GpuSample.model_validate_json(raw))
        return samples

    def stored_rows(self, keys: Sequence[tuple[str, int]]) -> list[tuple[int, Row]]:
        """Every stored fact row, cancel rows too, at these (GPU, ts ms) keys."""
        result = self.client.query(sql.stored_rows(VALUE_COLUMNS), parameters=_key_params(keys))
        return [stored_row(r) for r in result.result_rows]

    # -- repricing as a set operation (ledger/reprice.py) --------------------------------
    def reprice_plan(self, scope: Scope) -> list[tuple[int, str, PriceKey, int]]:
        """(UTC day number, GPU, pricing key, stored rows) of the facts a price-only scope
        covers."""
        where, params = sql.scope_filter(scope)
        result = self.client.query(sql.reprice_plan(where), parameters=params)
        return [
            (int(day), gpu, PriceKey(node, model, mig), int(rows))
            for day, gpu, node, model, mig, rows in result.result_rows
        ]

    def reprice_rows(self, scope: Scope, gpus: Sequence[str]) -> tuple[int, int]:
        """(cancel rows, all rows) stored for these GPUs in a scope."""
        where, params = sql.scope_filter(scope)
        result = self.client.query(
            sql.reprice_rows(where), parameters={**params, "mine": sorted(gpus)}
        )
        cancels, rows = result.result_rows[0]
        return int(cancels), int(rows)

    def reprice_leftovers(
        self, scope: Scope, gpus: Sequence[str], spans: Sequence[PriceSpan]
    ) -> tuple[list[tuple[str, int]], int]:
        """(GPU, ts ms) of the samples whose facts the store cannot reprice (re-cost them),
        and the rows it reprices from their raw samples."""
        where, params = sql.scope_filter(scope)
        starts = sorted({s.since_ms for s in spans if s.since_ms != SINCE_START_MS})
        inexact = sorted({"\x00".join(astuple(s.key)) for s in spans if not s.exact})
        result = self.client.query(
            sql.reprice_leftovers(where, VALUE_COLUMNS, SINCE_START_MS),
            parameters={
                **params,
                **_reprice_params(gpus, spans),
                "starts": starts,
                "inexact": inexact,
            },
        )
        leftovers, sampled = result.result_rows[0]
        return [(gpu, int(ts_ms)) for gpu, ts_ms in leftovers], int(sampled)

    def reprice(
        self,
        scope: Scope,
        gpus: Sequence[str],
        spans: Sequence[PriceSpan],
        token: str,
        stored: tuple[int, int],
        basis: str | None = None,
    ) -> None:
        """Cancel and restate, in the store, the live facts of `gpus` in `scope` whose
        pricing the spans change; with `basis` (the idle basis that judges a sample's
        utilization), those priced at 0 that now have a price, from their raw samples.

        `stored` is `reprice_rows`: with no cancel row there, every row is live once; the
        rows there bound what is written, which the store keeps as one insert block, so that
        no cancel row is stored without its restated row."""
        where, params = sql.scope_filter(scope)
        if basis is None:
            statement = sql.reprice(where, FACT_COLUMNS, SINCE_START_MS, cancelled=stored[0] > 0)
        else:
            statement = sql.reprice_from_samples(where, FACT_COLUMNS, SINCE_START_MS)
            params["basis"] = basis
        self._restate(statement, {**params, **_reprice_params(gpus, spans)}, token, stored)

    def retag(self, scope: Scope, gpus: Sequence[str], token: str, stored: tuple[int, int]) -> None:
        """Cancel and restate, in the store, the live facts of `gpus` in a job's scope whose
        tags are not `scope.retag`'s; `stored` as `reprice`'s."""
        where, params = sql.scope_filter(scope)
        statement = sql.retag(
            where, FACT_COLUMNS, [tag for tag, _ in scope.retag], cancelled=stored[0] > 0
        )
        params |= {f"new_{tag}": value for tag, value in scope.retag}
        self._restate(statement, {**params, "mine": sorted(gpus)}, token, stored)

    def _restate(
        self, statement: str, params: dict[str, Any], token: str, stored: tuple[int, int]
    ) -> None:
        """Run an `INSERT … SELECT` that cancels and restates stored rows: at most twice
        the `stored` rows, kept as one insert block (so that no cancel row is stored without
        its restated row), once per `token`."""
        settings = {
            **_dedup_settings(token),
            "min_insert_block_size_rows": max(2 * stored[1] + 1, 1_048_449),
            "min_insert_block_size_bytes": 1 << 40,
            "max_insert_threads": 1,
            "parallel_view_processing": 1,
            # Through Distributed tables, each shard restates its own GPUs' facts in place.
            "parallel_distributed_insert_select": 2,
        }
        # As a query, not a command: a command sends its bind values in the URL.
        self.client.raw_query(statement, parameters=params, settings=settings)


_SAMPLES = SampleDecoder()


def _key_params(keys: Sequence[tuple[str, int]]) -> dict[str, Any]:
    stamps = [ts for _, ts in keys]
    return {
        "g": sorted({gpu for gpu, _ in keys}),
        "lo": min(stamps, default=0),
        "hi": max(stamps, default=0),
        "k": [tuple(key) for key in keys],
    }


def _reprice_params(gpus: Sequence[str], spans: Sequence[PriceSpan]) -> dict[str, Any]:
    return {"mine": sorted(gpus), "spans": [span.as_tuple() for span in spans]}
