-- One row per job that has live GPU time. Attribution columns come from the facts (what was
-- charged), falling back to the jobs table where the facts have none; state, started_at and
-- ended_at come from jobs FINAL ('' and NULL while the job is unknown there).
-- Cells of the job, GPU and hour rollup without a cancelled row are read from the rollup, each
-- of its rows standing for its live samples; the other cells' facts are grouped per sample,
-- live = Σ sign > 0. mean_util_sm is NVML's busy time, mean_sm_active GPM's SM activity (NULL
-- where no GPU of the job has GPM), both weighted by GPU seconds.
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
            c.model AS model,
            c.environment AS environment,
            c.rows AS live,
            CAST(c.first_ts AS DateTime64(3, 'UTC')) AS first_ts,
            CAST(c.last_ts AS DateTime64(3, 'UTC')) AS last_ts,
            c.gpu_seconds AS gpu_seconds,
            c.cost_usd AS cost_usd,
            c.idle_cost_usd AS idle_cost_usd,
            c.util_gpu_seconds AS util_gpu_seconds,
            c.util_sm_seconds AS util_sm_seconds,
            c.util_rows AS util_rows,
            c.sm_gpu_seconds AS sm_gpu_seconds,
            c.sm_active_seconds AS sm_active_seconds
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
            f.model AS model,
            f.environment AS environment,
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
            sumIf(toInt64(f.sign), f.util_sm IS NOT NULL) AS util_rows,
            sumIf(toFloat64(f.duration_s) * f.share * f.sign, f.sm_active IS NOT NULL)
                AS sm_gpu_seconds,
            sumIf(toFloat64(assumeNotNull(f.sm_active)) * f.duration_s * f.share * f.sign,
                f.sm_active IS NOT NULL) AS sm_active_seconds
        FROM gpuledger.cost_facts AS f
        WHERE f.job_id != ''
            AND (f.job_id, f.gpu_uuid, toStartOfHour(f.ts))
                IN (SELECT job_id, gpu_uuid, hour FROM recheck)
        GROUP BY f.job_id, f.gpu_uuid, f.ts, f.team, f.project, f.job_type, f.experiment_id,
            f.model, f.environment
    ),
    per_job AS
    (
        SELECT
            p.job_id AS job_id,
            argMaxIf(p.team, p.last_ts, p.live > 0) AS fact_team,
            argMaxIf(p.project, p.last_ts, p.live > 0) AS fact_project,
            argMaxIf(p.job_type, p.last_ts, p.live > 0) AS fact_job_type,
            argMaxIf(p.experiment_id, p.last_ts, p.live > 0) AS fact_experiment_id,
            argMaxIf(p.model, p.last_ts, p.live > 0) AS fact_model,
            argMaxIf(p.environment, p.last_ts, p.live > 0) AS fact_environment,
            minIf(p.first_ts, p.live > 0) AS first_ts,
            maxIf(p.last_ts, p.live > 0) AS last_ts,
            sum(p.gpu_seconds) AS gpu_seconds,
            sum(p.cost_usd) AS cost_usd,
            sum(p.idle_cost_usd) AS idle_cost_usd,
            sum(p.util_gpu_seconds) AS util_gpu_seconds,
            sum(p.util_sm_seconds) AS util_sm_seconds,
            sum(p.util_rows) AS util_rows,
            sum(p.sm_gpu_seconds) AS sm_gpu_seconds,
            sum(p.sm_active_seconds) AS sm_active_seconds,
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
            j.model AS model,
            j.environment AS environment,
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
    c.gpus AS gpus,
    if(c.sm_gpu_seconds > 1e-9, c.sm_active_seconds / c.sm_gpu_seconds, NULL) AS mean_sm_active,
    if(c.fact_model != '', c.fact_model, ifNull(s.model, '')) AS model,
    if(c.fact_environment != '', c.fact_environment, ifNull(s.environment, '')) AS environment
FROM per_job AS c
LEFT JOIN job_state AS s ON s.job_id = c.job_id;
