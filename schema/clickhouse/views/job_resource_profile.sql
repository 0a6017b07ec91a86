-- Per job: GPU time, peaks, utilization and its p95, the inputs of right-sizing. The rollup's
-- cells without a cancelled row or a backfill overlap, each row standing for its live samples
-- (util_sm_p95 merges their weighted util values); the facts of the other cells per sample,
-- live ones only; a window's cut-off edges summed per cell as the materialized view does.
CREATE OR REPLACE VIEW gpuledger.job_resource_profile AS
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
            AND c.job_id != '' AND (c.cancelled_rows != 0 OR c.backfill_overlaps != 0)
        GROUP BY job_id, gpu_uuid, hour
        HAVING sum(c.cancelled_rows) != 0 OR sum(c.backfill_overlaps) != 0
    ),
    -- Their facts inside the window, per sample: live ones only.
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
            f.model AS model,
            f.environment AS environment,
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
            team, project, job_type, experiment_id, model, environment
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
            f.model AS model,
            f.environment AS environment,
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
            pricing_model, team, project, job_type, experiment_id, model, environment
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
            c.model AS model,
            c.environment AS environment,
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
            e.model AS model,
            e.environment AS environment,
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
            s.model AS model,
            s.environment AS environment,
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
            argMax(p.model, p.last_ts) AS fact_model,
            argMax(p.environment, p.last_ts) AS fact_environment,
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
            j.model AS model,
            j.environment AS environment,
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
    c.mean_util_sm AS mean_util_sm,
    if(c.fact_model != '', c.fact_model, ifNull(s.model, '')) AS model,
    if(c.fact_environment != '', c.fact_environment, ifNull(s.environment, '')) AS environment
FROM per_job AS c
LEFT JOIN job_state AS s ON s.job_id = c.job_id;
