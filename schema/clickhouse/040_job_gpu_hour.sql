-- Per job, GPU (or MIG instance) and hour rollup of cost_facts, and the analyst views that
-- scanned cost_facts row by row rewritten to read it (issue 7, benchmark 5): job_costs and
-- idle_waste (005), focus_hourly_charges, job_resource_profile and gpu_hourly_demand (010).
-- Their names, columns and answers are unchanged; only how they compute changed.
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
--   cells with a cancelled row are read from cost_facts, per sample as 005 and 010 did
--   (rare: only corrections cancel). cost_facts is ORDER BY (job_id, gpu_uuid, ts), so
--   `(job_id, gpu_uuid, toStartOfHour(ts)) IN (cells)` is a primary-key lookup;
-- - a window [start, end) (the 010 views): the rollup serves its whole hours, and its first
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
    gpu_seconds Float64,
    cost_usd Float64,
    idle_cost_usd Float64,
    util_gpu_seconds Float64,
    util_sm_seconds Float64,
    idle_gpu_seconds Float64,
    price_missing_gpu_seconds Float64,
    util_rows Int64,
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
ORDER BY (hour, job_id, gpu_uuid, node, gpu_model, mig_profile, team, project, job_type,
    experiment_id, provider, region, pricing_model, allocated)
SETTINGS non_replicated_deduplication_window = 10000;

CREATE MATERIALIZED VIEW IF NOT EXISTS gpuledger.cost_job_gpu_hour_mv
TO gpuledger.cost_job_gpu_hour AS
SELECT
    toStartOfHour(f.ts) AS hour,
    f.job_id AS job_id,
    f.gpu_uuid AS gpu_uuid,
    f.node AS node,
    f.gpu_model AS gpu_model,
    f.mig_profile AS mig_profile,
    f.team AS team,
    f.project AS project,
    f.job_type AS job_type,
    f.experiment_id AS experiment_id,
    f.provider AS provider,
    f.region AS region,
    f.pricing_model AS pricing_model,
    f.allocated AS allocated,
    sum(toFloat64(f.duration_s) * f.share * f.sign) AS gpu_seconds,
    sum(f.cost_usd * f.sign) AS cost_usd,
    sum(f.idle_cost_usd * f.sign) AS idle_cost_usd,
    sumIf(toFloat64(f.duration_s) * f.share * f.sign, f.util_sm IS NOT NULL) AS util_gpu_seconds,
    sumIf(toFloat64(assumeNotNull(f.util_sm)) * f.duration_s * f.share * f.sign,
        f.util_sm IS NOT NULL) AS util_sm_seconds,
    sum(toFloat64(f.duration_s) * f.share * f.idle * f.sign) AS idle_gpu_seconds,
    sum(toFloat64(f.duration_s) * f.share * f.price_missing * f.sign) AS price_missing_gpu_seconds,
    sumIf(toInt64(f.sign), f.util_sm IS NOT NULL) AS util_rows,
    sumIf(toInt64(f.sign), f.price_missing = 1) AS price_missing_rows,
    sum(toInt64(f.sign)) AS rows,
    toInt64(countIf(f.sign < 0)) AS cancelled_rows,
    toInt64(0) AS backfill_overlaps,
    min(f.ts) AS first_ts,
    max(f.ts) AS last_ts,
    max(f.util_sm) AS max_util_sm,
    max(f.mem_used_bytes) AS peak_mem_bytes,
    quantileExactWeightedStateIf(0.95)(assumeNotNull(f.util_sm),
        toUInt64(round(toFloat64(f.duration_s) * f.share * 1000)),
        f.sign > 0 AND f.util_sm IS NOT NULL) AS util_sm_p95
FROM gpuledger.cost_facts AS f
GROUP BY hour, job_id, gpu_uuid, node, gpu_model, mig_profile, team, project, job_type,
    experiment_id, provider, region, pricing_model, allocated;

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
        f.job_id AS job_id,
        f.gpu_uuid AS gpu_uuid,
        f.node AS node,
        f.gpu_model AS gpu_model,
        f.mig_profile AS mig_profile,
        f.team AS team,
        f.project AS project,
        f.job_type AS job_type,
        f.experiment_id AS experiment_id,
        f.provider AS provider,
        f.region AS region,
        f.pricing_model AS pricing_model,
        f.allocated AS allocated,
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
GROUP BY hour, job_id, gpu_uuid, node, gpu_model, mig_profile, team, project, job_type,
    experiment_id, provider, region, pricing_model, allocated
HAVING sum(x.rows) != 0 OR sum(x.cancelled_rows) != 0;

-- job_costs (005): cells without a cancelled row from the rollup, each of its rows standing
-- for its live samples; the other cells' facts grouped per sample as before, live = Σ sign.
-- Then per job exactly as 005 did.
CREATE OR REPLACE VIEW gpuledger.job_costs AS
WITH
    recheck AS
    (
        SELECT c.job_id AS job_id, c.gpu_uuid AS gpu_uuid, c.hour AS hour
        FROM gpuledger.cost_job_gpu_hour AS c
        WHERE c.job_id != '' AND c.cancelled_rows != 0
        GROUP BY job_id, gpu_uuid, hour
        HAVING sum(c.cancelled_rows) != 0
    ),
    per_sample AS
    (
        SELECT
            c.job_id AS job_id,
            c.gpu_uuid AS gpu_uuid,
            c.team AS team,
            c.project AS project,
            c.job_type AS job_type,
            c.experiment_id AS experiment_id,
            c.rows AS live,
            CAST(c.first_ts AS DateTime64(3, 'UTC')) AS first_ts,
            CAST(c.last_ts AS DateTime64(3, 'UTC')) AS last_ts,
            c.gpu_seconds AS gpu_seconds,
            c.cost_usd AS cost_usd,
            c.idle_cost_usd AS idle_cost_usd,
            c.util_gpu_seconds AS util_gpu_seconds,
            c.util_sm_seconds AS util_sm_seconds,
            c.util_rows AS util_rows
        FROM gpuledger.cost_job_gpu_hour AS c
        WHERE c.job_id != ''
            AND (c.job_id, c.gpu_uuid, c.hour) NOT IN (SELECT job_id, gpu_uuid, hour FROM recheck)
        UNION ALL
        SELECT
            f.job_id AS job_id,
            f.gpu_uuid AS gpu_uuid,
            f.team AS team,
            f.project AS project,
            f.job_type AS job_type,
            f.experiment_id AS experiment_id,
            sum(toInt64(f.sign)) AS live,
            f.ts AS first_ts,
            f.ts AS last_ts,
            sum(toFloat64(f.duration_s) * f.share * f.sign) AS gpu_seconds,
            sum(f.cost_usd * f.sign) AS cost_usd,
            sum(f.idle_cost_usd * f.sign) AS idle_cost_usd,
            sumIf(toFloat64(f.duration_s) * f.share * f.sign, f.util_sm IS NOT NULL)
                AS util_gpu_seconds,
            sumIf(toFloat64(assumeNotNull(f.util_sm)) * f.duration_s * f.share * f.sign,
                f.util_sm IS NOT NULL) AS util_sm_seconds,
            sumIf(toInt64(f.sign), f.util_sm IS NOT NULL) AS util_rows
        FROM gpuledger.cost_facts AS f
        WHERE f.job_id != ''
            AND (f.job_id, f.gpu_uuid, toStartOfHour(f.ts))
                IN (SELECT job_id, gpu_uuid, hour FROM recheck)
        GROUP BY f.job_id, f.gpu_uuid, f.ts, f.team, f.project, f.job_type, f.experiment_id
    ),
    per_job AS
    (
        SELECT
            p.job_id AS job_id,
            argMaxIf(p.team, p.last_ts, p.live > 0) AS fact_team,
            argMaxIf(p.project, p.last_ts, p.live > 0) AS fact_project,
            argMaxIf(p.job_type, p.last_ts, p.live > 0) AS fact_job_type,
            argMaxIf(p.experiment_id, p.last_ts, p.live > 0) AS fact_experiment_id,
            minIf(p.first_ts, p.live > 0) AS first_ts,
            maxIf(p.last_ts, p.live > 0) AS last_ts,
            sum(p.gpu_seconds) AS gpu_seconds,
            sum(p.cost_usd) AS cost_usd,
            sum(p.idle_cost_usd) AS idle_cost_usd,
            sum(p.util_gpu_seconds) AS util_gpu_seconds,
            sum(p.util_sm_seconds) AS util_sm_seconds,
            sum(p.util_rows) AS util_rows,
            uniqExactIf(p.gpu_uuid, p.live > 0) AS gpus
        FROM per_sample AS p
        GROUP BY job_id
        HAVING sum(p.live) != 0
    ),
    job_state AS
    (
        SELECT
            j.job_id AS job_id,
            j.state AS state,
            j.team AS team,
            j.project AS project,
            j.job_type AS job_type,
            j.experiment_id AS experiment_id,
            j.started_at AS started_at,
            j.ended_at AS ended_at
        FROM gpuledger.jobs AS j FINAL
    )
SELECT
    c.job_id AS job_id,
    if(c.fact_team != '', c.fact_team, ifNull(s.team, '')) AS team,
    if(c.fact_project != '', c.fact_project, ifNull(s.project, '')) AS project,
    if(c.fact_job_type != '', c.fact_job_type, ifNull(s.job_type, '')) AS job_type,
    if(c.fact_experiment_id != '', c.fact_experiment_id, ifNull(s.experiment_id, ''))
        AS experiment_id,
    ifNull(s.state, '') AS state,
    s.started_at AS started_at,
    s.ended_at AS ended_at,
    c.first_ts AS first_ts,
    c.last_ts AS last_ts,
    c.gpu_seconds AS gpu_seconds,
    c.gpu_seconds / 3600 AS gpu_hours,
    c.cost_usd AS cost_usd,
    c.idle_cost_usd AS idle_cost_usd,
    if(c.util_rows > 0 AND c.util_gpu_seconds > 0, c.util_sm_seconds / c.util_gpu_seconds, NULL)
        AS mean_util_sm,
    c.gpus AS gpus
FROM per_job AS c
LEFT JOIN job_state AS s ON s.job_id = c.job_id;

-- idle_waste (005): sums only, exact from the rollup.
CREATE OR REPLACE VIEW gpuledger.idle_waste AS
SELECT
    c.team AS team,
    c.project AS project,
    c.job_id AS job_id,
    c.gpu_uuid AS gpu_uuid,
    c.node AS node,
    sum(c.gpu_seconds) AS gpu_seconds,
    sum(c.cost_usd) AS cost_usd,
    sum(c.idle_gpu_seconds) AS idle_gpu_seconds,
    sum(c.idle_cost_usd) AS idle_cost_usd,
    if(gpu_seconds > 1e-9, idle_gpu_seconds / gpu_seconds, NULL) AS idle_share,
    if(cost_usd > 1e-12, idle_cost_usd / cost_usd, NULL) AS wasted_share
FROM gpuledger.cost_job_gpu_hour AS c
WHERE c.allocated = 1
GROUP BY team, project, job_id, gpu_uuid, node
HAVING sum(c.rows) != 0;

-- focus_hourly_charges (010): sums only, exact from the rollup.
CREATE OR REPLACE VIEW gpuledger.focus_hourly_charges AS
WITH
    -- The rollup serves the hours [rollup_from, rollup_to): the whole hours of the window,
    -- and its first and last hour too when all their facts lie inside it (as for a window
    -- from the first fact to just after the last). The rest, inside the window's first and
    -- last hour, comes from cost_facts.
    if((SELECT min(b.first_ts) FROM gpuledger.cost_job_gpu_hour AS b
            WHERE b.hour = toStartOfHour({start:DateTime64(3, 'UTC')}))
            >= {start:DateTime64(3, 'UTC')},
        toStartOfHour({start:DateTime64(3, 'UTC')}),
        toStartOfHour({start:DateTime64(3, 'UTC')}) + toIntervalHour(1)) AS rollup_from,
    if((SELECT max(b.last_ts) FROM gpuledger.cost_job_gpu_hour AS b
            WHERE b.hour = toStartOfHour({end:DateTime64(3, 'UTC')}))
            < {end:DateTime64(3, 'UTC')},
        toStartOfHour({end:DateTime64(3, 'UTC')}) + toIntervalHour(1),
        toStartOfHour({end:DateTime64(3, 'UTC')})) AS rollup_to,
    charges AS
    (
        SELECT
            c.hour AS hour,
            c.gpu_uuid AS gpu_uuid,
            c.node AS node,
            c.gpu_model AS gpu_model,
            c.mig_profile AS mig_profile,
            c.job_id AS job_id,
            c.team AS team,
            c.project AS project,
            c.job_type AS job_type,
            c.experiment_id AS experiment_id,
            c.provider AS provider,
            c.region AS region,
            c.pricing_model AS pricing_model,
            c.rows AS rows,
            c.gpu_seconds AS gpu_seconds,
            c.cost_usd AS cost_usd,
            c.idle_cost_usd AS idle_cost_usd,
            c.util_gpu_seconds AS util_gpu_seconds,
            c.util_sm_seconds AS util_sm_seconds,
            c.price_missing_gpu_seconds AS price_missing_gpu_seconds
        FROM gpuledger.cost_job_gpu_hour AS c
        WHERE c.hour >= rollup_from AND c.hour < rollup_to
        UNION ALL
        SELECT
            toStartOfHour(f.ts) AS hour,
            f.gpu_uuid AS gpu_uuid,
            f.node AS node,
            f.gpu_model AS gpu_model,
            f.mig_profile AS mig_profile,
            f.job_id AS job_id,
            f.team AS team,
            f.project AS project,
            f.job_type AS job_type,
            f.experiment_id AS experiment_id,
            f.provider AS provider,
            f.region AS region,
            f.pricing_model AS pricing_model,
            toInt64(f.sign) AS rows,
            toFloat64(f.duration_s) * f.share * f.sign AS gpu_seconds,
            f.cost_usd * f.sign AS cost_usd,
            f.idle_cost_usd * f.sign AS idle_cost_usd,
            if(f.util_sm IS NOT NULL, toFloat64(f.duration_s) * f.share * f.sign, 0)
                AS util_gpu_seconds,
            if(f.util_sm IS NOT NULL,
                toFloat64(assumeNotNull(f.util_sm)) * f.duration_s * f.share * f.sign, 0)
                AS util_sm_seconds,
            toFloat64(f.duration_s) * f.share * f.price_missing * f.sign
                AS price_missing_gpu_seconds
        FROM gpuledger.cost_facts AS f
        WHERE f.ts >= {start:DateTime64(3, 'UTC')} AND f.ts < {end:DateTime64(3, 'UTC')}
            AND (f.ts < rollup_from OR f.ts >= rollup_to)
    )
SELECT
    x.hour AS hour,
    x.gpu_uuid AS gpu_uuid,
    x.node AS node,
    x.gpu_model AS gpu_model,
    x.mig_profile AS mig_profile,
    x.job_id AS job_id,
    x.team AS team,
    x.project AS project,
    x.job_type AS job_type,
    x.experiment_id AS experiment_id,
    x.provider AS provider,
    x.region AS region,
    x.pricing_model AS pricing_model,
    sum(x.rows) AS live_rows,
    sum(x.gpu_seconds) AS gpu_seconds,
    sum(x.cost_usd) AS cost_usd,
    sum(x.idle_cost_usd) AS idle_cost_usd,
    sum(x.util_gpu_seconds) AS util_gpu_seconds,
    sum(x.util_sm_seconds) AS util_sm_seconds,
    sum(x.price_missing_gpu_seconds) AS price_missing_gpu_seconds
FROM charges AS x
GROUP BY hour, gpu_uuid, node, gpu_model, mig_profile, job_id, team, project, job_type,
    experiment_id, provider, region, pricing_model
HAVING live_rows != 0;

-- job_resource_profile (010): the rollup's cells without a cancelled row or a backfill
-- overlap, each row standing for its live samples (util_sm_p95 merges their weighted util
-- values); the facts of the other cells per sample, live ones only, as 010 did; the window's
-- cut-off edges summed per cell as the materialized view does.
CREATE OR REPLACE VIEW gpuledger.job_resource_profile AS
WITH
    -- The rollup serves the hours [rollup_from, rollup_to): the whole hours of the window,
    -- and its first and last hour too when all their facts lie inside it (as for a window
    -- from the first fact to just after the last). The rest, inside the window's first and
    -- last hour, comes from cost_facts.
    if((SELECT min(b.first_ts) FROM gpuledger.cost_job_gpu_hour AS b
            WHERE b.hour = toStartOfHour({start:DateTime64(3, 'UTC')}))
            >= {start:DateTime64(3, 'UTC')},
        toStartOfHour({start:DateTime64(3, 'UTC')}),
        toStartOfHour({start:DateTime64(3, 'UTC')}) + toIntervalHour(1)) AS rollup_from,
    if((SELECT max(b.last_ts) FROM gpuledger.cost_job_gpu_hour AS b
            WHERE b.hour = toStartOfHour({end:DateTime64(3, 'UTC')}))
            < {end:DateTime64(3, 'UTC')},
        toStartOfHour({end:DateTime64(3, 'UTC')}) + toIntervalHour(1),
        toStartOfHour({end:DateTime64(3, 'UTC')})) AS rollup_to,
    -- Cells of the window's hours with a cancelled row or a backfill overlap.
    recheck AS
    (
        SELECT c.job_id AS job_id, c.gpu_uuid AS gpu_uuid, c.hour AS hour
        FROM gpuledger.cost_job_gpu_hour AS c
        WHERE c.hour >= toStartOfHour({start:DateTime64(3, 'UTC')})
            AND c.hour < {end:DateTime64(3, 'UTC')}
            AND c.job_id != '' AND (c.cancelled_rows != 0 OR c.backfill_overlaps != 0)
        GROUP BY job_id, gpu_uuid, hour
        HAVING sum(c.cancelled_rows) != 0 OR sum(c.backfill_overlaps) != 0
    ),
    -- Their facts inside the window, per sample: live ones only, as 010.
    recheck_samples AS
    (
        SELECT
            f.job_id AS job_id,
            f.gpu_uuid AS gpu_uuid,
            f.ts AS ts,
            f.gpu_model AS gpu_model,
            f.mig_profile AS mig_profile,
            f.provider AS provider,
            f.region AS region,
            f.pricing_model AS pricing_model,
            f.team AS team,
            f.project AS project,
            f.job_type AS job_type,
            f.experiment_id AS experiment_id,
            sum(toInt64(f.sign)) AS live,
            sum(toFloat64(f.duration_s) * f.share * f.sign) AS gpu_seconds,
            sum(f.cost_usd * f.sign) AS cost_usd,
            sum(f.idle_cost_usd * f.sign) AS idle_cost_usd,
            max(f.util_sm) AS util_sm,
            max(f.mem_used_bytes) AS mem_used_bytes
        FROM gpuledger.cost_facts AS f
        WHERE f.job_id != ''
            AND f.ts >= {start:DateTime64(3, 'UTC')} AND f.ts < {end:DateTime64(3, 'UTC')}
            AND (f.job_id, f.gpu_uuid, toStartOfHour(f.ts))
                IN (SELECT job_id, gpu_uuid, hour FROM recheck)
        GROUP BY job_id, gpu_uuid, ts, gpu_model, mig_profile, provider, region, pricing_model,
            team, project, job_type, experiment_id
        HAVING live > 0
    ),
    -- The facts inside the window in its first and last hour that the rollup does not serve,
    -- of the other cells: summed per cell as the materialized view does (every row is a
    -- live sample there).
    edge_cells AS
    (
        SELECT
            f.job_id AS job_id,
            f.gpu_uuid AS gpu_uuid,
            toStartOfHour(f.ts) AS hour,
            f.gpu_model AS gpu_model,
            f.mig_profile AS mig_profile,
            f.provider AS provider,
            f.region AS region,
            f.pricing_model AS pricing_model,
            f.team AS team,
            f.project AS project,
            f.job_type AS job_type,
            f.experiment_id AS experiment_id,
            min(f.ts) AS first_ts,
            max(f.ts) AS last_ts,
            sum(toFloat64(f.duration_s) * f.share * f.sign) AS gpu_seconds,
            sum(f.cost_usd * f.sign) AS cost_usd,
            sum(f.idle_cost_usd * f.sign) AS idle_cost_usd,
            sumIf(toFloat64(f.duration_s) * f.share * f.sign, f.util_sm IS NOT NULL)
                AS util_gpu_seconds,
            sumIf(toFloat64(assumeNotNull(f.util_sm)) * f.duration_s * f.share * f.sign,
                f.util_sm IS NOT NULL) AS util_sm_seconds,
            max(f.util_sm) AS max_util_sm,
            max(f.mem_used_bytes) AS peak_mem_bytes,
            quantileExactWeightedStateIf(0.95)(assumeNotNull(f.util_sm),
                toUInt64(round(toFloat64(f.duration_s) * f.share * 1000)),
                f.sign > 0 AND f.util_sm IS NOT NULL) AS util_sm_p95
        FROM gpuledger.cost_facts AS f
        WHERE f.job_id != ''
            AND f.ts >= {start:DateTime64(3, 'UTC')} AND f.ts < {end:DateTime64(3, 'UTC')}
            AND (f.ts < rollup_from OR f.ts >= rollup_to)
        GROUP BY job_id, gpu_uuid, hour, gpu_model, mig_profile, provider, region,
            pricing_model, team, project, job_type, experiment_id
        HAVING (job_id, gpu_uuid, hour) NOT IN (SELECT job_id, gpu_uuid, hour FROM recheck)
    ),
    per_sample AS
    (
        SELECT
            c.job_id AS job_id,
            c.gpu_uuid AS gpu_uuid,
            c.gpu_model AS gpu_model,
            c.mig_profile AS mig_profile,
            c.provider AS provider,
            c.region AS region,
            c.pricing_model AS pricing_model,
            c.team AS team,
            c.project AS project,
            c.job_type AS job_type,
            c.experiment_id AS experiment_id,
            CAST(c.first_ts AS DateTime64(3, 'UTC')) AS first_ts,
            CAST(c.last_ts AS DateTime64(3, 'UTC')) AS last_ts,
            c.gpu_seconds AS gpu_seconds,
            c.cost_usd AS cost_usd,
            c.idle_cost_usd AS idle_cost_usd,
            c.util_gpu_seconds AS util_gpu_seconds,
            c.util_sm_seconds AS util_sm_seconds,
            CAST(c.max_util_sm AS Nullable(Float32)) AS max_util_sm,
            CAST(c.peak_mem_bytes AS UInt64) AS peak_mem_bytes,
            c.util_sm_p95 AS util_sm_p95
        FROM gpuledger.cost_job_gpu_hour AS c
        WHERE c.hour >= rollup_from AND c.hour < rollup_to AND c.job_id != ''
            AND (c.job_id, c.gpu_uuid, c.hour) NOT IN (SELECT job_id, gpu_uuid, hour FROM recheck)
        UNION ALL
        SELECT
            e.job_id AS job_id,
            e.gpu_uuid AS gpu_uuid,
            e.gpu_model AS gpu_model,
            e.mig_profile AS mig_profile,
            e.provider AS provider,
            e.region AS region,
            e.pricing_model AS pricing_model,
            e.team AS team,
            e.project AS project,
            e.job_type AS job_type,
            e.experiment_id AS experiment_id,
            e.first_ts AS first_ts,
            e.last_ts AS last_ts,
            e.gpu_seconds AS gpu_seconds,
            e.cost_usd AS cost_usd,
            e.idle_cost_usd AS idle_cost_usd,
            e.util_gpu_seconds AS util_gpu_seconds,
            e.util_sm_seconds AS util_sm_seconds,
            e.max_util_sm AS max_util_sm,
            e.peak_mem_bytes AS peak_mem_bytes,
            e.util_sm_p95 AS util_sm_p95
        FROM edge_cells AS e
        UNION ALL
        SELECT
            s.job_id AS job_id,
            s.gpu_uuid AS gpu_uuid,
            s.gpu_model AS gpu_model,
            s.mig_profile AS mig_profile,
            s.provider AS provider,
            s.region AS region,
            s.pricing_model AS pricing_model,
            s.team AS team,
            s.project AS project,
            s.job_type AS job_type,
            s.experiment_id AS experiment_id,
            s.ts AS first_ts,
            s.ts AS last_ts,
            s.gpu_seconds AS gpu_seconds,
            s.cost_usd AS cost_usd,
            s.idle_cost_usd AS idle_cost_usd,
            if(s.util_sm IS NOT NULL, s.gpu_seconds, 0) AS util_gpu_seconds,
            if(s.util_sm IS NOT NULL, assumeNotNull(s.util_sm) * s.gpu_seconds, 0)
                AS util_sm_seconds,
            s.util_sm AS max_util_sm,
            s.mem_used_bytes AS peak_mem_bytes,
            initializeAggregation('quantileExactWeightedStateIf(0.95)',
                assumeNotNull(s.util_sm), toUInt64(round(s.gpu_seconds * 1000)),
                s.util_sm IS NOT NULL) AS util_sm_p95
        FROM recheck_samples AS s
    ),
    per_job AS
    (
        SELECT
            p.job_id AS job_id,
            p.gpu_model AS gpu_model,
            p.mig_profile AS mig_profile,
            p.provider AS provider,
            p.region AS region,
            p.pricing_model AS pricing_model,
            argMax(p.team, p.last_ts) AS fact_team,
            argMax(p.project, p.last_ts) AS fact_project,
            argMax(p.job_type, p.last_ts) AS fact_job_type,
            argMax(p.experiment_id, p.last_ts) AS fact_experiment_id,
            uniqExact(p.gpu_uuid) AS gpus,
            min(p.first_ts) AS first_ts,
            max(p.last_ts) AS last_ts,
            sum(p.gpu_seconds) AS gpu_seconds,
            sum(p.cost_usd) AS cost_usd,
            sum(p.idle_cost_usd) AS idle_cost_usd,
            max(p.peak_mem_bytes) AS peak_mem_bytes,
            -- NULL where no live sample has a util_sm (MIG), as quantileExactWeighted gives
            if(max(p.max_util_sm) IS NULL, NULL,
                quantileExactWeightedMerge(0.95)(p.util_sm_p95)) AS p95_util_sm,
            max(p.max_util_sm) AS max_util_sm,
            if(sum(p.util_gpu_seconds) > 0, sum(p.util_sm_seconds) / sum(p.util_gpu_seconds),
                NULL) AS mean_util_sm
        FROM per_sample AS p
        GROUP BY job_id, gpu_model, mig_profile, provider, region, pricing_model
    ),
    job_state AS
    (
        SELECT
            j.job_id AS job_id,
            j.state AS state,
            j.team AS team,
            j.project AS project,
            j.job_type AS job_type,
            j.experiment_id AS experiment_id,
            j.started_at AS started_at,
            j.ended_at AS ended_at,
            j.labels AS labels
        FROM gpuledger.jobs AS j FINAL
    )
SELECT
    c.job_id AS job_id,
    if(c.fact_team != '', c.fact_team, ifNull(s.team, '')) AS team,
    if(c.fact_project != '', c.fact_project, ifNull(s.project, '')) AS project,
    if(c.fact_job_type != '', c.fact_job_type, ifNull(s.job_type, '')) AS job_type,
    if(c.fact_experiment_id != '', c.fact_experiment_id, ifNull(s.experiment_id, ''))
        AS experiment_id,
    ifNull(s.state, '') AS state,
    s.started_at AS started_at,
    s.ended_at AS ended_at,
    s.labels AS labels,
    c.gpu_model AS gpu_model,
    c.mig_profile AS mig_profile,
    c.provider AS provider,
    c.region AS region,
    c.pricing_model AS pricing_model,
    c.gpus AS gpus,
    c.first_ts AS first_ts,
    c.last_ts AS last_ts,
    c.gpu_seconds AS gpu_seconds,
    c.gpu_seconds / 3600 AS gpu_hours,
    c.cost_usd AS cost_usd,
    c.idle_cost_usd AS idle_cost_usd,
    c.peak_mem_bytes AS peak_mem_bytes,
    c.p95_util_sm AS p95_util_sm,
    c.max_util_sm AS max_util_sm,
    c.mean_util_sm AS mean_util_sm
FROM per_job AS c
LEFT JOIN job_state AS s ON s.job_id = c.job_id;

-- gpu_hourly_demand (010): sums only, exact from the rollup.
CREATE OR REPLACE VIEW gpuledger.gpu_hourly_demand AS
WITH
    -- The rollup serves the hours [rollup_from, rollup_to): the whole hours of the window,
    -- and its first and last hour too when all their facts lie inside it (as for a window
    -- from the first fact to just after the last). The rest, inside the window's first and
    -- last hour, comes from cost_facts.
    if((SELECT min(b.first_ts) FROM gpuledger.cost_job_gpu_hour AS b
            WHERE b.hour = toStartOfHour({start:DateTime64(3, 'UTC')}))
            >= {start:DateTime64(3, 'UTC')},
        toStartOfHour({start:DateTime64(3, 'UTC')}),
        toStartOfHour({start:DateTime64(3, 'UTC')}) + toIntervalHour(1)) AS rollup_from,
    if((SELECT max(b.last_ts) FROM gpuledger.cost_job_gpu_hour AS b
            WHERE b.hour = toStartOfHour({end:DateTime64(3, 'UTC')}))
            < {end:DateTime64(3, 'UTC')},
        toStartOfHour({end:DateTime64(3, 'UTC')}) + toIntervalHour(1),
        toStartOfHour({end:DateTime64(3, 'UTC')})) AS rollup_to,
    demand AS
    (
        SELECT
            c.hour AS hour,
            c.provider AS provider,
            c.region AS region,
            c.gpu_model AS gpu_model,
            c.mig_profile AS mig_profile,
            c.pricing_model AS pricing_model,
            c.rows AS rows,
            c.gpu_seconds AS gpu_seconds,
            c.cost_usd AS cost_usd
        FROM gpuledger.cost_job_gpu_hour AS c
        WHERE c.hour >= rollup_from AND c.hour < rollup_to
        UNION ALL
        SELECT
            toStartOfHour(f.ts) AS hour,
            f.provider AS provider,
            f.region AS region,
            f.gpu_model AS gpu_model,
            f.mig_profile AS mig_profile,
            f.pricing_model AS pricing_model,
            toInt64(f.sign) AS rows,
            toFloat64(f.duration_s) * f.share * f.sign AS gpu_seconds,
            f.cost_usd * f.sign AS cost_usd
        FROM gpuledger.cost_facts AS f
        WHERE f.ts >= {start:DateTime64(3, 'UTC')} AND f.ts < {end:DateTime64(3, 'UTC')}
            AND (f.ts < rollup_from OR f.ts >= rollup_to)
    )
SELECT
    d.hour AS hour,
    d.provider AS provider,
    d.region AS region,
    d.gpu_model AS gpu_model,
    d.mig_profile AS mig_profile,
    d.pricing_model AS pricing_model,
    sum(d.gpu_seconds) / 3600 AS gpus,
    sum(d.cost_usd) AS cost_usd
FROM demand AS d
GROUP BY hour, provider, region, gpu_model, mig_profile, pricing_model
HAVING sum(d.rows) != 0;
