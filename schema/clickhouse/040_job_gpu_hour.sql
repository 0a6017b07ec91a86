-- Per job, GPU (or MIG instance) and hour rollup of cost_facts, which the analyst views
-- job_costs, idle_waste, focus_hourly_charges, job_resource_profile and gpu_hourly_demand
-- (views/) read instead of scanning cost_facts row by row.
--
-- A cell is one (job_id, gpu_uuid, hour). Its rows here are keyed by every attribution
-- column a view groups by, and hold:
-- - signed sums as in cost_hour (004): gpu_seconds, cost_usd, ..., util_rows, `rows` = Σ sign,
--   `price_missing_rows` = Σ sign of rows with price_missing = 1, and `cancelled_rows`, the
--   number of sign = -1 rows;
-- - first_ts, last_ts, max_util_sm, peak_mem_bytes, util_sm_p95 over every row, whatever its
--   sign. In a cell without a cancelled row every row is a live sample (a cancel row has the
--   job, GPU and ts of the row it cancels, so it lands in the same cell), and these are the
--   views' "over live samples" exactly. util_sm_p95 holds the (util_sm, weight) pairs of the
--   +1 rows, weight = round(gpu_seconds * 1000) of the row, as job_resource_profile weighs
--   one sample.
-- Views take a cell from here when that is exact, and from cost_facts otherwise:
-- - sums (all five views): always exact here;
-- - live-sample detail (first/last ts, gpus, peaks, p95: job_costs, job_resource_profile):
--   cells with a cancelled row are read from cost_facts, per sample
--   (rare: only corrections cancel). cost_facts is ORDER BY (job_id, gpu_uuid, ts), so
--   `(job_id, gpu_uuid, toStartOfHour(ts)) IN (cells)` is a primary-key lookup;
-- - a window [start, end) (the parameterized views): the rollup serves its whole hours, and its first
--   and last hour too when all their facts lie inside the window; otherwise the part of
--   those hours inside the window is read from cost_facts by ts (a scan of that day's
--   partition: a window on whole hours is the fast one).
-- As for every SummingMergeTree: read with sum()/min()/max() and GROUP BY, never row by row.
-- The dedup window lets an insert's deduplication token reach this table too (004).

CREATE TABLE IF NOT EXISTS gpuledger.cost_job_gpu_hour
(
    hour DateTime('UTC'),
    job_id String,
    gpu_uuid String,
    node LowCardinality(String),
    gpu_model LowCardinality(String),
    mig_profile LowCardinality(String),
    team LowCardinality(String),
    project LowCardinality(String),
    job_type LowCardinality(String),
    experiment_id LowCardinality(String),
    provider LowCardinality(String),
    region LowCardinality(String),
    pricing_model LowCardinality(String),
    allocated UInt8,
    ${rollup_sum_columns},
    price_missing_rows Int64,
    rows Int64,
    cancelled_rows Int64,
    backfill_overlaps Int64,
    first_ts SimpleAggregateFunction(min, DateTime64(3, 'UTC')),
    last_ts SimpleAggregateFunction(max, DateTime64(3, 'UTC')),
    max_util_sm SimpleAggregateFunction(max, Nullable(Float32)),
    peak_mem_bytes SimpleAggregateFunction(max, UInt64),
    util_sm_p95 AggregateFunction(quantileExactWeighted(0.95), Float32, UInt64)
)
ENGINE = SummingMergeTree
PARTITION BY toYYYYMM(hour)
ORDER BY (${job_gpu_hour_key})
SETTINGS non_replicated_deduplication_window = 10000;

CREATE MATERIALIZED VIEW IF NOT EXISTS gpuledger.cost_job_gpu_hour_mv
TO gpuledger.cost_job_gpu_hour AS
SELECT
    toStartOfHour(f.ts) AS hour,
    ${job_gpu_hour_attribution},
    ${rollup_sums},
    ${job_gpu_hour_detail}
FROM gpuledger.cost_facts AS f
GROUP BY ${job_gpu_hour_key};

-- Backfill: the facts stored before the materialized view existed. It inserts, per key, the
-- facts' sums minus what this table already holds, so it is exact while workers keep writing
-- (their rows reach both sides) and a second run, after one cut short or a repeat, adds
-- nothing (keys whose row counts already agree are skipped). A key the view had already fed
-- gets backfill_overlaps = 1: its p95 state counts those rows twice (min and max do not mind),
-- so job_resource_profile reads that cell from cost_facts. Not covered: an insert that has
-- committed its facts but not yet its rollup rows in the instant this statement starts would
-- count twice in the sums; for a guarantee, migrate while no worker writes (the deploy
-- files run `gpuledger db migrate` before the workers).
INSERT INTO gpuledger.cost_job_gpu_hour
SELECT
    x.hour AS hour,
    x.job_id AS job_id,
    x.gpu_uuid AS gpu_uuid,
    x.node AS node,
    x.gpu_model AS gpu_model,
    x.mig_profile AS mig_profile,
    x.team AS team,
    x.project AS project,
    x.job_type AS job_type,
    x.experiment_id AS experiment_id,
    x.provider AS provider,
    x.region AS region,
    x.pricing_model AS pricing_model,
    x.allocated AS allocated,
    sum(x.gpu_seconds) AS gpu_seconds,
    sum(x.cost_usd) AS cost_usd,
    sum(x.idle_cost_usd) AS idle_cost_usd,
    sum(x.util_gpu_seconds) AS util_gpu_seconds,
    sum(x.util_sm_seconds) AS util_sm_seconds,
    sum(x.idle_gpu_seconds) AS idle_gpu_seconds,
    sum(x.price_missing_gpu_seconds) AS price_missing_gpu_seconds,
    sum(x.util_rows) AS util_rows,
    sum(x.price_missing_rows) AS price_missing_rows,
    sum(x.rows) AS rows,
    sum(x.cancelled_rows) AS cancelled_rows,
    toInt64(max(x.stored) > 0) AS backfill_overlaps,
    min(x.first_ts) AS first_ts,
    max(x.last_ts) AS last_ts,
    max(x.max_util_sm) AS max_util_sm,
    max(x.peak_mem_bytes) AS peak_mem_bytes,
    quantileExactWeightedStateIf(0.95)(assumeNotNull(x.util_sm), x.weight,
        x.stored = 0 AND x.rows > 0 AND x.util_sm IS NOT NULL) AS util_sm_p95
FROM
(
    SELECT
        toDateTime(toStartOfHour(f.ts), 'UTC') AS hour,
        ${job_gpu_hour_attribution},
        toUInt8(0) AS stored,
        toFloat64(f.duration_s) * f.share * f.sign AS gpu_seconds,
        f.cost_usd * f.sign AS cost_usd,
        f.idle_cost_usd * f.sign AS idle_cost_usd,
        if(f.util_sm IS NOT NULL, toFloat64(f.duration_s) * f.share * f.sign, 0)
            AS util_gpu_seconds,
        if(f.util_sm IS NOT NULL,
            toFloat64(assumeNotNull(f.util_sm)) * f.duration_s * f.share * f.sign, 0)
            AS util_sm_seconds,
        toFloat64(f.duration_s) * f.share * f.idle * f.sign AS idle_gpu_seconds,
        toFloat64(f.duration_s) * f.share * f.price_missing * f.sign AS price_missing_gpu_seconds,
        if(f.util_sm IS NOT NULL, toInt64(f.sign), 0) AS util_rows,
        if(f.price_missing = 1, toInt64(f.sign), 0) AS price_missing_rows,
        toInt64(f.sign) AS rows,
        toInt64(f.sign < 0) AS cancelled_rows,
        f.ts AS first_ts,
        f.ts AS last_ts,
        f.util_sm AS max_util_sm,
        f.mem_used_bytes AS peak_mem_bytes,
        f.util_sm AS util_sm,
        toUInt64(round(toFloat64(f.duration_s) * f.share * 1000)) AS weight
    FROM gpuledger.cost_facts AS f
    UNION ALL
    SELECT
        r.hour,
        r.job_id,
        r.gpu_uuid,
        r.node,
        r.gpu_model,
        r.mig_profile,
        r.team,
        r.project,
        r.job_type,
        r.experiment_id,
        r.provider,
        r.region,
        r.pricing_model,
        r.allocated,
        toUInt8(1),
        -r.gpu_seconds,
        -r.cost_usd,
        -r.idle_cost_usd,
        -r.util_gpu_seconds,
        -r.util_sm_seconds,
        -r.idle_gpu_seconds,
        -r.price_missing_gpu_seconds,
        -r.util_rows,
        -r.price_missing_rows,
        -r.rows,
        -r.cancelled_rows,
        CAST(r.first_ts AS DateTime64(3, 'UTC')),
        CAST(r.last_ts AS DateTime64(3, 'UTC')),
        CAST(r.max_util_sm AS Nullable(Float32)),
        CAST(r.peak_mem_bytes AS UInt64),
        CAST(NULL AS Nullable(Float32)),
        toUInt64(0)
    FROM gpuledger.cost_job_gpu_hour AS r
) AS x
GROUP BY ${job_gpu_hour_key}
HAVING sum(x.rows) != 0 OR sum(x.cancelled_rows) != 0;
