-- Per job and GPU configuration (model, MIG profile, provider, region, pricing model) over a
-- window [start, end): job_resource_profile's columns, then the sums and the GPU set that
-- job_costs adds up per job, from cost_job_gpu_hour_between (its live samples).
-- Attribution is the latest live sample's, falling back to the jobs table where the facts have
-- none; state, started_at, ended_at and labels come from jobs FINAL ('' and NULL while the job
-- is unknown there).
CREATE OR REPLACE VIEW gpuledger.job_usage AS
WITH
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
            uniqExactState(p.gpu_uuid) AS gpu_set,
            min(p.first_ts) AS first_ts,
            max(p.last_ts) AS last_ts,
            sum(p.gpu_seconds) AS gpu_seconds,
            sum(p.cost_usd) AS cost_usd,
            sum(p.idle_cost_usd) AS idle_cost_usd,
            sum(p.util_gpu_seconds) AS util_gpu_seconds,
            sum(p.util_sm_seconds) AS util_sm_seconds,
            sum(p.util_rows) AS util_rows,
            sum(p.sm_gpu_seconds) AS sm_gpu_seconds,
            sum(p.sm_active_seconds) AS sm_active_seconds,
            max(p.peak_mem_bytes) AS peak_mem_bytes,
            -- NULL where no live sample has a util_sm (MIG), as quantileExactWeighted gives
            if(max(p.max_util_sm) IS NULL, NULL,
                quantileExactWeightedMerge(0.95)(p.util_sm_p95)) AS p95_util_sm,
            max(p.max_util_sm) AS max_util_sm
        FROM gpuledger.cost_job_gpu_hour_between(
            start = {start:DateTime64(3, 'UTC')}, end = {end:DateTime64(3, 'UTC')}) AS p
        WHERE p.job_id != ''
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
    if(c.util_gpu_seconds > 0, c.util_sm_seconds / c.util_gpu_seconds, NULL) AS mean_util_sm,
    if(c.fact_model != '', c.fact_model, ifNull(s.model, '')) AS model,
    if(c.fact_environment != '', c.fact_environment, ifNull(s.environment, '')) AS environment,
    c.util_gpu_seconds AS util_gpu_seconds,
    c.util_sm_seconds AS util_sm_seconds,
    c.util_rows AS util_rows,
    c.sm_gpu_seconds AS sm_gpu_seconds,
    c.sm_active_seconds AS sm_active_seconds,
    c.gpu_set AS gpu_set
FROM per_job AS c
LEFT JOIN job_state AS s ON s.job_id = c.job_id;
