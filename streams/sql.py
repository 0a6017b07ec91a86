"""Every query the stream worker runs against ClickHouse, in one place (the tables are those
of schema/clickhouse). Parameters are ClickHouse's `{name:Type}`, bound by the client:
nothing from a label or a message is ever pasted into the text. The few pieces that vary
(a filter built from a `Scope`, the columns of a fact) are put in by the functions here.

Times are read as epoch milliseconds (`toUnixTimestamp64Milli`) and compared with
`fromUnixTimestamp64Milli(…, 'UTC')`, the form in which the worker keeps them
(`gpuledger.ledger.timekeys`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from gpuledger.ledger.restate import Scope
from gpuledger.ledger.timekeys import to_ms


@dataclass(frozen=True)
class Layout:
    """The columns a read selects, named as the fields of what it builds; those in `ms` are
    times (DateTime64), read as epoch milliseconds and given back in seconds."""

    names: tuple[str, ...]
    ms: frozenset[str] = frozenset()

    def select(self, table: str = "") -> str:
        """The SELECT list (of the columns of `table`, when given)."""
        prefix = f"{table}." if table else ""
        return ", ".join(
            f"toUnixTimestamp64Milli({prefix}{name})" if name in self.ms else f"{prefix}{name}"
            for name in self.names
        )

    def row(self, values: Mapping[str, Any]) -> list[Any]:
        """The row of these values by name, times in ms (what `named` reads back)."""
        return [to_ms(values[name]) if name in self.ms else values[name] for name in self.names]

    def named(self, row: Sequence[Any]) -> dict[str, Any]:
        """A row's values by name, times in seconds (a null time stays None)."""
        return {
            name: value / 1000 if value is not None and name in self.ms else value
            for name, value in zip(self.names, row, strict=True)
        }


# --- state rebuilt after a restart ------------------------------------------------------

LOAD_JOBS = """
SELECT job_id, state, team, project, job_type, experiment_id, gpu_uuids,
       toUnixTimestamp64Milli(started_at), toUnixTimestamp64Milli(ended_at),
       labels, toUnixTimestamp64Milli(updated_at), field_ts, model, environment
FROM gpuledger.jobs FINAL"""

# A `PriceEntry` of the `prices` table.
PRICES = Layout(
    ("provider", "region", "gpu_model", "pricing_model", "usd_per_gpu_hour", "effective_from"),
    ms=frozenset({"effective_from"}),
)
LOAD_PRICES = f"""
SELECT {PRICES.select()}
FROM gpuledger.prices FINAL"""

# A `NodeInfo` of the `nodes` and `node_history` tables.
NODES = Layout(
    ("node", "provider", "region", "instance_type", "pricing_model", "usd_per_gpu_hour", "ts"),
    ms=frozenset({"ts"}),
)
# Every NodeInfo stored (`node_history`, and `nodes` rows written before it).
LOAD_NODES = f"""
SELECT {NODES.select()}
FROM (SELECT * FROM gpuledger.node_history FINAL
      UNION ALL SELECT * FROM gpuledger.nodes FINAL)
ORDER BY node, ts
LIMIT 1 BY node, ts"""

# --- which worker corrects what -----------------------------------------------------------

_GPU_PARTITIONS = "SELECT gpu_uuid, samples_partition FROM gpuledger.gpu_partitions FINAL"
GPU_PARTITIONS = _GPU_PARTITIONS + " WHERE 1"
GPU_PARTITIONS_OF = _GPU_PARTITIONS + " WHERE gpu_uuid IN {g:Array(String)}"

CORRECTION_PROGRESS = """
SELECT samples_partition, topic, partition, next_offset
FROM gpuledger.correction_progress FINAL"""

# --- samples and facts stored -------------------------------------------------------------

# Answered from the parts' min/max of ts (the partition key's column): no rows are read.
NEWEST_FACT_TS = "SELECT toUnixTimestamp64Milli(max(ts)) FROM gpuledger.cost_facts"

STORED_SAMPLE_KEYS = """
SELECT DISTINCT gpu_uuid, toUnixTimestamp64Milli(ts) FROM gpuledger.cost_facts
WHERE gpu_uuid IN {g:Array(String)}
  AND ts BETWEEN fromUnixTimestamp64Milli({lo:Int64}, 'UTC')
             AND fromUnixTimestamp64Milli({hi:Int64}, 'UTC')"""


# The string fields of a `Scope` that select facts by equality, named as the facts' columns.
EQUAL_COLUMNS = ("job_id", "node", "gpu_model", "provider", "region", "pricing_model")
# The set fields of a `Scope` that select facts by membership, and the facts' columns.
MEMBER_COLUMNS = (("gpu_uuids", "gpu_uuid"), ("job_ids", "job_id"))


def scope_filter(scope: Scope) -> tuple[str, dict[str, Any]]:
    """The WHERE clause (and its parameters) of the stored facts a `Scope` covers."""
    clauses: list[str] = []
    params: dict[str, Any] = {}
    for field, column in MEMBER_COLUMNS:
        members = getattr(scope, field)
        if members is not None:
            clauses.append(f"{column} IN {{{field}:Array(String)}}")
            params[field] = sorted(members)
    for column in EQUAL_COLUMNS:
        value = getattr(scope, column)
        if value is not None:
            clauses.append(f"{column} = {{{column}:String}}")
            params[column] = value
    if scope.t_from is not None:
        clauses.append("ts >= fromUnixTimestamp64Milli({t_from:Int64}, 'UTC')")
        params["t_from"] = to_ms(scope.t_from)
    if scope.t_to is not None:
        clauses.append("ts < fromUnixTimestamp64Milli({t_to:Int64}, 'UTC')")
        params["t_to"] = to_ms(scope.t_to)
    return (" AND ".join(clauses) or "1"), params


def keys_in_scope(where: str) -> str:
    """(gpu_uuid, ts ms) of the stored facts that `where` (`scope_filter`) selects."""
    return f"""
SELECT DISTINCT gpu_uuid, toUnixTimestamp64Milli(ts) FROM gpuledger.cost_facts
WHERE {where}"""


# The samples (and below, the stored fact rows) at some (gpu_uuid, ts ms) keys: the GPU
# list and the time range narrow the read to the GPUs' granules and the days' partitions.
_AT_KEYS = """
WHERE gpu_uuid IN {g:Array(String)}
  AND ts BETWEEN fromUnixTimestamp64Milli({lo:Int64}, 'UTC')
             AND fromUnixTimestamp64Milli({hi:Int64}, 'UTC')
  AND (gpu_uuid, toUnixTimestamp64Milli(ts)) IN {k:Array(Tuple(String, Int64))}"""
RAW_SAMPLES = f"""
SELECT payload FROM gpuledger.samples_raw{_AT_KEYS}
ORDER BY gpu_uuid, ts LIMIT 1 BY gpu_uuid, ts"""


def stored_rows(value_columns: Sequence[str]) -> str:
    """Stored fact rows at some (gpu_uuid, ts ms) keys: sign, then `value_columns` (ts in ms)."""
    cols = ", ".join("toUnixTimestamp64Milli(ts)" if c == "ts" else c for c in value_columns)
    return f"""
SELECT sign, {cols} FROM gpuledger.cost_facts{_AT_KEYS}"""


# --- repricing as a set operation (ledger/reprice.py) -----------------------------------------


# The pricing keys, and their rows, of the stored facts a price-only scope covers, per UTC
# day (the facts' partition) and GPU.
def reprice_plan(where: str) -> str:
    return f"""
SELECT intDiv(toUnixTimestamp64Milli(ts), 86400000) AS day, gpu_uuid, node, gpu_model,
       mig_profile, count()
FROM gpuledger.cost_facts
WHERE {where}
GROUP BY day, gpu_uuid, node, gpu_model, mig_profile"""


# `PriceSpan.as_tuple`, one per span.
SPANS = "Array(Tuple(String, String, String, Int64, String, String, String, Float64, UInt8, UInt8))"
PRICING_COLUMNS = ("provider", "region", "pricing_model", "usd_per_gpu_hour", "price_missing")
# A repriced row's pricing columns, and the span's columns (`_repriced`) that replace them.
_PRICING = dict(
    zip(
        PRICING_COLUMNS,
        ("new_provider", "new_region", "new_pricing_model", "new_rate", "new_missing"),
        strict=True,
    )
)


def _repriced(
    where: str,
    value_columns: Sequence[str],
    since_start_ms: int,
    *,
    cancelled: bool,
    samples: bool = False,
) -> str:
    """The live rows of the GPUs `mine` in a scope, each with the span pricing it, whether
    the store can reprice it by the ratio of the rates (`in_store`) or from its raw sample
    (`from_sample`; else the sample is re-costed), and whether its pricing changes.

    `cancelled`: some rows there were cancelled before, so a row is live `live` times, its +1
    copies less its -1 copies (a grouping of every column); without, each +1 row is live
    once. `samples`: read the raw samples of the rows priced at 0 (the sample's interval and
    utilization, and how many live rows it has: one row holds the whole GPU, share 1)."""
    changed = " OR ".join(f"{new} != {old}" for old, new in _PRICING.items())
    rows = _live_rows(where, value_columns, cancelled=cancelled or samples)
    exact = f"s.exact = 1 AND NOT (l.ts_ms = s.since_ms AND s.since_ms != {since_start_ms})"
    unpriced = "l.usd_per_gpu_hour = 0 AND s.rate != 0"
    sampled = "0"
    if samples:
        rows = f"""
    SELECT r.*, sum(r.live) OVER (PARTITION BY r.gpu_uuid, r.ts_ms) AS sample_rows,
           raw.payload AS payload
    FROM ({rows}
    ) AS r
    LEFT JOIN (
        SELECT gpu_uuid, toUnixTimestamp64Milli(ts) AS ts_ms, any(payload) AS payload
        FROM gpuledger.samples_raw
        WHERE gpu_uuid IN {{mine:Array(String)}}
          AND ts >= fromUnixTimestamp64Milli({{t_from:Int64}}, 'UTC')
          AND ts < fromUnixTimestamp64Milli({{t_to:Int64}}, 'UTC')
        GROUP BY gpu_uuid, ts_ms
    ) AS raw ON r.gpu_uuid = raw.gpu_uuid AND r.ts_ms = raw.ts_ms"""
        sampled = f"{exact} AND {unpriced} AND l.sample_rows = 1 AND l.payload != ''"
    return f"""
SELECT l.*, s.provider AS new_provider, s.region AS new_region,
       s.pricing_model AS new_pricing_model, s.rate AS new_rate, s.missing AS new_missing,
       {exact} AND NOT ({unpriced}) AS in_store,
       {sampled} AS from_sample,
       {changed} AS changed
FROM ({rows}
) AS l
ASOF INNER JOIN (
    SELECT s.1 AS node, s.2 AS gpu_model, s.3 AS mig_profile, s.4 AS since_ms,
           s.5 AS provider, s.6 AS region, s.7 AS pricing_model, s.8 AS rate,
           s.9 AS missing, s.10 AS exact
    FROM (SELECT arrayJoin({{spans:{SPANS}}}) AS s)
) AS s
ON l.node = s.node AND l.gpu_model = s.gpu_model AND l.mig_profile = s.mig_profile
   AND l.ts_ms >= s.since_ms"""


def _live_rows(where: str, value_columns: Sequence[str], *, cancelled: bool) -> str:
    """The live rows of the GPUs `mine` in a scope, with their time in ms (`ts_ms`) and how
    many times each is live (`live`): see `_repriced`'s `cancelled`."""
    cols = ", ".join(value_columns)
    mine = f"{where} AND gpu_uuid IN {{mine:Array(String)}}"
    if cancelled:
        return f"""
    SELECT {cols}, toUnixTimestamp64Milli(ts) AS ts_ms, sum(sign) AS live
    FROM gpuledger.cost_facts WHERE {mine}
    GROUP BY {cols}
    HAVING live > 0"""
    return f"""
    SELECT {cols}, toUnixTimestamp64Milli(ts) AS ts_ms, 1 AS live
    FROM gpuledger.cost_facts WHERE {mine} AND sign = 1"""


def reprice_rows(where: str) -> str:
    """(cancel rows, all rows) of the facts of the GPUs `mine` in a scope."""
    return f"""
SELECT countIf(sign < 0), count() FROM gpuledger.cost_facts
WHERE {where} AND gpu_uuid IN {{mine:Array(String)}}"""


def reprice_leftovers(where: str, value_columns: Sequence[str], since_start_ms: int) -> str:
    """(gpu_uuid, ts ms) of the samples whose facts the store cannot reprice, and how many
    rows it reprices from their raw samples. Only rows that may be either are read: priced
    at 0, at a span's first millisecond (`starts`), or of a key whose spans are not exact
    (`inexact`)."""
    suspects = (
        f"{where} AND (usd_per_gpu_hour = 0"
        " OR has({starts:Array(Int64)}, toUnixTimestamp64Milli(ts))"
        " OR has({inexact:Array(String)}, concat(node, '\\0', gpu_model, '\\0', mig_profile)))"
    )
    return f"""
SELECT groupUniqArrayIf((gpu_uuid, ts_ms), NOT in_store AND NOT from_sample),
       countIf(from_sample)
FROM ({_repriced(suspects, value_columns, since_start_ms, cancelled=True, samples=True)})"""


def reprice(
    where: str, fact_columns: Sequence[str], since_start_ms: int, *, cancelled: bool
) -> str:
    """Cancel (`live` times) and restate, in one statement, each live row whose pricing
    changes: the restated row takes the span's pricing, and its money scales by the ratio of
    the new rate to the old."""
    ratio = "if(usd_per_gpu_hour = 0, 1.0, new_rate / usd_per_gpu_hour)"
    money = {"cost_usd": f"cost_usd * {ratio}", "idle_cost_usd": f"idle_cost_usd * {ratio}"}
    body = _repriced(where, _values(fact_columns), since_start_ms, cancelled=cancelled)
    return _restate(fact_columns, body, {**_PRICING, **money}, "in_store AND changed")


# The raw sample's utilization as the idle basis judges it (`IdleBasis.judge`); null when
# the sample has none.
_UTIL_SM = "JSONExtract(payload, 'util_sm', 'Nullable(Float64)')"
_JUDGED = (
    f"if({{basis:String}} = 'sm_active', "
    f"coalesce(JSONExtract(payload, 'sm_active', 'Nullable(Float64)'), {_UTIL_SM}), {_UTIL_SM})"
)


def reprice_from_samples(where: str, fact_columns: Sequence[str], since_start_ms: int) -> str:
    """Cancel and restate the live rows priced at 0 that now have a price, where the sample
    had one row (the whole GPU): their money is the cost model's, from the raw sample's
    interval and utilization (`rate * interval_s / 3600`, idle share `1 - utilization`)."""
    cost = "(new_rate * JSONExtractFloat(payload, 'interval_s') / 3600.0)"
    money = {
        "cost_usd": cost,
        "idle_cost_usd": f"ifNull({cost} * (1.0 - {_JUDGED}), 0.0)",
    }
    unpriced = f"{where} AND usd_per_gpu_hour = 0"
    body = _repriced(unpriced, _values(fact_columns), since_start_ms, cancelled=True, samples=True)
    return _restate(fact_columns, body, {**_PRICING, **money}, "from_sample")


def retag(where: str, fact_columns: Sequence[str], tags: Sequence[str], *, cancelled: bool) -> str:
    """Cancel (`live` times) and restate, in one statement, each live row of the GPUs `mine`
    in a job's scope whose `tags` are not the job's new ones (`{new_<tag>:String}`): the
    restated row takes them, and nothing else of it moves."""
    body = _live_rows(where, _values(fact_columns), cancelled=cancelled)
    restated = {tag: f"{{new_{tag}:String}}" for tag in tags}
    changed = " OR ".join(f"{tag} != {value}" for tag, value in restated.items())
    return _restate(fact_columns, body, restated, changed)


def _values(fact_columns: Sequence[str]) -> list[str]:
    return [c for c in fact_columns if c != "sign"]


def _restate(
    fact_columns: Sequence[str], body: str, restated: Mapping[str, str], condition: str
) -> str:
    """Write each row of `body` (`live` of it) cancelled, and restated with the `restated`
    values by column, where `condition` holds."""
    out = ", ".join(
        "sign" if c == "sign" else f"if(sign = 1, {restated[c]}, {c})" if c in restated else c
        for c in fact_columns
    )
    return f"""
INSERT INTO gpuledger.cost_facts ({", ".join(fact_columns)})
SELECT {out}
FROM ({body})
ARRAY JOIN arrayConcat(arrayWithConstant(toUInt64(live), toInt8(-1)), [toInt8(1)]) AS sign
WHERE {condition}"""


# The newest fact's end (event time), from its start in ms and its duration.
LATEST_FACT_END = """
SELECT toUnixTimestamp64Milli(max(ts)), argMax(duration_s, ts), count()
FROM gpuledger.cost_facts"""

# --- dead letters and usage ---------------------------------------------------------------

STORED_DEADLETTERS = """
SELECT DISTINCT offset, idx FROM gpuledger.deadletters
WHERE topic = {t:String} AND partition = {p:UInt32}
  AND offset BETWEEN {lo:UInt64} AND {hi:UInt64}"""

STORED_USAGE_KEYS = """
SELECT DISTINCT job_id, source, toUnixTimestamp64Milli(ts) FROM gpuledger.usage
WHERE job_id IN {j:Array(String)}
  AND ts BETWEEN fromUnixTimestamp64Milli({lo:Int64}, 'UTC')
             AND fromUnixTimestamp64Milli({hi:Int64}, 'UTC')
  AND (job_id, source, toUnixTimestamp64Milli(ts)) IN {k:Array(Tuple(String, String, Int64))}"""

# --- alerts -------------------------------------------------------------------------------

# An `Alert` of the `alerts` table (its `rule` included): what is written and read back.
ALERTS = Layout(
    (
        "ts", "kind", "rule", "state", "gpu_uuid", "node", "job_id", "team", "project",
        "since", "idle_seconds", "wasted_usd", "message",
    ),
    ms=frozenset({"ts", "since"}),
)  # fmt: skip


def latest_alerts(where: str, tail: str = "ORDER BY l.ts") -> str:
    """The latest row of each alert of the kinds {kinds:Array(String)} (on a tie in ts the
    resolution wins, as `alerts_firing`): `ALERTS`, then when its episode first fired; times
    in ms.
    `where` filters the latest rows (`l`), `tail` orders and limits them. The worker and
    `gpuledger alerts` read alerts through this one query."""
    return f"""
SELECT {ALERTS.select("l")}, toUnixTimestamp64Milli(f.first_ts)
FROM
(
    SELECT * FROM gpuledger.alerts
    WHERE kind IN {{kinds:Array(String)}}
    ORDER BY ts DESC, state = 'resolved' DESC
    LIMIT 1 BY kind, rule, gpu_uuid, job_id, team, project
) AS l
LEFT JOIN
(
    SELECT kind, rule, gpu_uuid, job_id, team, project, since, min(ts) AS first_ts
    FROM gpuledger.alerts
    WHERE kind IN {{kinds:Array(String)}} AND state = 'firing'
    GROUP BY kind, rule, gpu_uuid, job_id, team, project, since
) AS f
USING (kind, rule, gpu_uuid, job_id, team, project, since)
WHERE {where}
{tail}
"""


# Filters of `latest_alerts`: the alerts firing; and those too, or whose latest row is {t} on.
FIRING = "l.state = 'firing'"
FIRING_OR_SINCE = "(l.state = 'firing' OR l.ts >= fromUnixTimestamp64Milli({t:Int64}, 'UTC'))"

# `AlertEvent.identity` of every alert row of some kinds from a time on.
ALERT_IDENTITIES_SINCE = """
SELECT kind, rule, gpu_uuid, job_id, team, project, state, toUnixTimestamp64Milli(ts)
FROM gpuledger.alerts
WHERE kind IN {kinds:Array(String)}
  AND ts >= fromUnixTimestamp64Milli({t:Int64}, 'UTC')"""

# --- what idle detection replays ------------------------------------------------------------

# The end of each GPU's newest fact, for the GPUs (all, or {gpus}) with facts from {t} on.
GPU_ENDS = """
SELECT gpu_uuid, toUnixTimestamp64Milli(max(ts)), argMax(duration_s, ts)
FROM gpuledger.cost_facts
WHERE ts >= fromUnixTimestamp64Milli({t:Int64}, 'UTC')
  AND ({all:UInt8} = 1 OR gpu_uuid IN {gpus:Array(String)})
GROUP BY gpu_uuid"""

# GPU_ENDS of the GPUs that may have an idle episode to rebuild: those in {keep} (firing
# episodes) and those with an allocated fact under {thr} (the busy time or the SM activity,
# whichever is lower) in the last {h} ms before their newest; of the facts from {t} on, of
# every GPU or of {gpus}. The tail of any other GPU opens no episode: a restarted worker need
# not replay it.
GPU_ENDS_MAY_IDLE = f"""{GPU_ENDS}
HAVING gpu_uuid IN {{keep:Array(String)}}
    OR maxIf(ts, allocated = 1
                 AND least(ifNull(util_sm, 2), ifNull(sm_active, 2)) < {{thr:Float64}})
        >= max(ts) - toIntervalMillisecond({{h:UInt64}})"""

# Each GPU's newest fact time (ms) from {t} on, from the job, GPU and hour rollup: a day of a
# large fleet in a few hundred thousand rows instead of its facts.
GPU_LAST_TS = """
SELECT gpu_uuid, toUnixTimestamp64Milli(max(last_ts)) AS last
FROM gpuledger.cost_job_gpu_hour
WHERE hour >= toStartOfHour(fromUnixTimestamp64Milli({t:Int64}, 'UTC'))
GROUP BY gpu_uuid
HAVING last >= {t:Int64}"""

# Live facts (cancelled ones netted out) of some GPUs from {t} on, in time order: the fields of
# a `StoredFact`, in its order (ts in ms).
LIVE_FACTS = """
SELECT toUnixTimestamp64Milli(f.ts) AS t, f.gpu_uuid AS gpu, f.node, f.job_id, f.team,
       f.project, f.job_type, any(f.duration_s), any(f.util_sm), sum(f.idle_cost_usd * f.sign),
       f.allocated, any(f.sm_active)
FROM gpuledger.cost_facts AS f
WHERE f.ts >= fromUnixTimestamp64Milli({t:Int64}, 'UTC')
  AND ({all:UInt8} = 1 OR f.gpu_uuid IN {gpus:Array(String)})
GROUP BY t, gpu, f.node, f.job_id, f.team, f.project, f.job_type, f.allocated
HAVING sum(f.sign) > 0
ORDER BY gpu, t
"""

# Idle seconds and dollars of a (GPU, job) in [{a}, {b}) under the threshold {thr}, and the
# end of its last fact there; {sm} = 1 judges the SM activity where a fact has one.
IDLE_GAP = """
SELECT sum(d), sum(w), max(t + d) FROM (
    SELECT toUnixTimestamp64Milli(ts) / 1000 AS t, any(duration_s) AS d,
           if({sm:UInt8} = 1, ifNull(any(sm_active), any(util_sm)), any(util_sm)) AS u,
           sum(idle_cost_usd * sign) AS w
    FROM gpuledger.cost_facts
    WHERE gpu_uuid = {g:String} AND job_id = {j:String}
      AND ts >= fromUnixTimestamp64Milli({a:Int64}, 'UTC')
      AND ts < fromUnixTimestamp64Milli({b:Int64}, 'UTC')
    GROUP BY ts
    HAVING sum(sign) > 0)
WHERE u < {thr:Float64}"""

# --- budgets --------------------------------------------------------------------------------

ACTIVE_BUDGETS = """
SELECT month, team, project, budget_usd FROM gpuledger.budgets FINAL
WHERE active = 1 ORDER BY month, team, project"""

# Spend per (team, project): this month up to {asof}, and in the hour before it.
SPEND = """
SELECT team, project, sum(mtd), sum(last_hour) FROM (
    SELECT team, project, sum(cost_usd) AS mtd, 0 AS last_hour
    FROM gpuledger.cost_hour
    WHERE ts >= toDateTime({start:UInt32}, 'UTC')
      AND ts < toDateTime({asof:UInt32}, 'UTC')
    GROUP BY team, project
    UNION ALL
    SELECT team, project, 0 AS mtd, sum(cost_usd) AS last_hour
    FROM gpuledger.cost_minute
    WHERE ts >= toDateTime({hour:UInt32}, 'UTC')
      AND ts < toDateTime({asof:UInt32}, 'UTC')
    GROUP BY team, project)
GROUP BY team, project"""
