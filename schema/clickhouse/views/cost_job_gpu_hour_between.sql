-- The job, GPU and hour rollup cut to a window [start, end), exact over the window's live
-- samples (Σ sign > 0 per sample and attribution): rows of the rollup's keys and measures, to
-- be summed per group like the rollup itself. The rollup serves the cells of rollup_span's hours without
-- a cancelled row or a backfill overlap, each of its rows standing for its live samples; the
-- other facts of the window (in its first and last hour, or of those cells) are read from
-- cost_facts, a row per live sample. first_ts, last_ts, max_util_sm, peak_mem_bytes and
-- util_sm_p95 (util_sm weighed by GPU seconds) are over those samples. focus_hourly_charges,
-- gpu_hourly_demand and job_usage group it.
CREATE OR REPLACE VIEW gpuledger.cost_job_gpu_hour_between AS
WITH
    -- The hours the rollup serves; the rest of the window comes from cost_facts.
    (SELECT rollup_from FROM gpuledger.rollup_span(
        start = {start:DateTime64(3, 'UTC')}, end = {end:DateTime64(3, 'UTC')})) AS rollup_from,
    (SELECT rollup_to FROM gpuledger.rollup_span(
        start = {start:DateTime64(3, 'UTC')}, end = {end:DateTime64(3, 'UTC')})) AS rollup_to,
    -- Cells of the window's hours with a cancelled row or a backfill overlap.
    recheck AS
    (
        SELECT c.job_id AS job_id, c.gpu_uuid AS gpu_uuid, c.hour AS hour
        FROM gpuledger.cost_job_gpu_hour AS c
        WHERE c.hour >= toStartOfHour({start:DateTime64(3, 'UTC')})
            AND c.hour < {end:DateTime64(3, 'UTC')}
            AND (c.cancelled_rows != 0 OR c.backfill_overlaps != 0)
        GROUP BY job_id, gpu_uuid, hour
        HAVING sum(c.cancelled_rows) != 0 OR sum(c.backfill_overlaps) != 0
    ),
    -- The facts of the window that the rollup does not serve: those of the other cells in the
    -- hours outside [rollup_from, rollup_to), and those of the recheck cells (a primary-key
    -- lookup: cost_facts is ORDER BY job_id, gpu_uuid, ts).
    unserved AS
    (
        SELECT *
        FROM gpuledger.cost_facts AS f
        WHERE f.ts >= {start:DateTime64(3, 'UTC')} AND f.ts < {end:DateTime64(3, 'UTC')}
            AND (f.ts < rollup_from OR f.ts >= rollup_to)
            AND (f.job_id, f.gpu_uuid, toStartOfHour(f.ts))
                NOT IN (SELECT job_id, gpu_uuid, hour FROM recheck)
        UNION ALL
        SELECT *
        FROM gpuledger.cost_facts AS f
        WHERE f.ts >= {start:DateTime64(3, 'UTC')} AND f.ts < {end:DateTime64(3, 'UTC')}
            AND (f.job_id, f.gpu_uuid, toStartOfHour(f.ts))
                IN (SELECT job_id, gpu_uuid, hour FROM recheck)
    ),
    samples AS
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
            c.model AS model,
            c.environment AS environment,
            c.rows AS rows,
            c.gpu_seconds AS gpu_seconds,
            c.cost_usd AS cost_usd,
            c.idle_cost_usd AS idle_cost_usd,
            c.util_gpu_seconds AS util_gpu_seconds,
            c.util_sm_seconds AS util_sm_seconds,
            c.util_rows AS util_rows,
            c.price_missing_gpu_seconds AS price_missing_gpu_seconds,
            c.sm_gpu_seconds AS sm_gpu_seconds,
            c.sm_active_seconds AS sm_active_seconds,
            CAST(c.first_ts AS DateTime64(3, 'UTC')) AS first_ts,
            CAST(c.last_ts AS DateTime64(3, 'UTC')) AS last_ts,
            CAST(c.max_util_sm AS Nullable(Float32)) AS max_util_sm,
            CAST(c.peak_mem_bytes AS UInt64) AS peak_mem_bytes,
            c.util_sm_p95 AS util_sm_p95
        FROM gpuledger.cost_job_gpu_hour AS c
        WHERE c.hour >= rollup_from AND c.hour < rollup_to
            AND (c.job_id, c.gpu_uuid, c.hour) NOT IN (SELECT job_id, gpu_uuid, hour FROM recheck)
        UNION ALL
        SELECT  -- a live sample, in the columns above
            toStartOfHour(f.ts),
            f.gpu_uuid,
            f.node,
            f.gpu_model,
            f.mig_profile,
            f.job_id,
            f.team,
            f.project,
            f.job_type,
            f.experiment_id,
            f.provider,
            f.region,
            f.pricing_model,
            f.model,
            f.environment,
            sum(toInt64(f.sign)),
            sum(toFloat64(f.duration_s) * f.share * f.sign),
            sum(f.cost_usd * f.sign),
            sum(f.idle_cost_usd * f.sign),
            sumIf(toFloat64(f.duration_s) * f.share * f.sign, f.util_sm IS NOT NULL),
            sumIf(toFloat64(assumeNotNull(f.util_sm)) * f.duration_s * f.share * f.sign,
                f.util_sm IS NOT NULL),
            sumIf(toInt64(f.sign), f.util_sm IS NOT NULL),
            sum(toFloat64(f.duration_s) * f.share * f.price_missing * f.sign),
            sumIf(toFloat64(f.duration_s) * f.share * f.sign, f.sm_active IS NOT NULL),
            sumIf(toFloat64(assumeNotNull(f.sm_active)) * f.duration_s * f.share * f.sign,
                f.sm_active IS NOT NULL),
            f.ts,
            f.ts,
            max(f.util_sm),
            max(f.mem_used_bytes),
            -- its util_sm, weighed as the rollup weighs one row
            initializeAggregation('quantileExactWeightedStateIf(0.95)',
                assumeNotNull(max(f.util_sm)),
                toUInt64(round(sum(toFloat64(f.duration_s) * f.share * f.sign) * 1000)),
                max(f.util_sm) IS NOT NULL)
        FROM unserved AS f
        GROUP BY f.job_id, f.gpu_uuid, f.ts, f.node, f.gpu_model, f.mig_profile, f.provider,
            f.region, f.pricing_model, f.team, f.project, f.job_type, f.experiment_id, f.model,
            f.environment
        HAVING sum(toInt64(f.sign)) > 0
    )
SELECT *
FROM samples;
