-- FOCUS charges per hour (the export's rows): sums only, exact from the job, GPU and hour
-- rollup. model_costs and environment_costs sum it per tag.
CREATE OR REPLACE VIEW gpuledger.focus_hourly_charges AS
WITH
    -- The hours the rollup serves; the rest of the window comes from cost_facts.
    (SELECT rollup_from FROM gpuledger.rollup_span(
        start = {start:DateTime64(3, 'UTC')}, end = {end:DateTime64(3, 'UTC')})) AS rollup_from,
    (SELECT rollup_to FROM gpuledger.rollup_span(
        start = {start:DateTime64(3, 'UTC')}, end = {end:DateTime64(3, 'UTC')})) AS rollup_to,
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
            c.price_missing_gpu_seconds AS price_missing_gpu_seconds,
            c.sm_gpu_seconds AS sm_gpu_seconds,
            c.sm_active_seconds AS sm_active_seconds,
            c.model AS model,
            c.environment AS environment
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
                AS price_missing_gpu_seconds,
            if(f.sm_active IS NOT NULL, toFloat64(f.duration_s) * f.share * f.sign, 0)
                AS sm_gpu_seconds,
            if(f.sm_active IS NOT NULL,
                toFloat64(assumeNotNull(f.sm_active)) * f.duration_s * f.share * f.sign, 0)
                AS sm_active_seconds,
            f.model AS model,
            f.environment AS environment
        FROM gpuledger.cost_facts AS f
        WHERE f.ts >= {start:DateTime64(3, 'UTC')} AND f.ts < {end:DateTime64(3, 'UTC')}
            AND (f.ts < rollup_from OR f.ts >= rollup_to)
    )
SELECT
    hour, gpu_uuid, node, gpu_model, mig_profile, job_id, team, project, job_type, experiment_id,
    provider, region, pricing_model,
    sum(x.rows) AS live_rows,
    sum(x.gpu_seconds) AS gpu_seconds,
    sum(x.cost_usd) AS cost_usd,
    sum(x.idle_cost_usd) AS idle_cost_usd,
    sum(x.util_gpu_seconds) AS util_gpu_seconds,
    sum(x.util_sm_seconds) AS util_sm_seconds,
    sum(x.price_missing_gpu_seconds) AS price_missing_gpu_seconds,
    model,
    environment,
    sum(x.sm_gpu_seconds) AS sm_gpu_seconds,
    sum(x.sm_active_seconds) AS sm_active_seconds
FROM charges AS x
GROUP BY hour, gpu_uuid, node, gpu_model, mig_profile, job_id, team, project, job_type,
    experiment_id, provider, region, pricing_model, model, environment
HAVING live_rows != 0;
