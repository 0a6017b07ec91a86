-- FOCUS charges per hour (the export's rows): sums only, exact from the job, GPU and hour
-- rollup (cost_job_gpu_hour_between). model_costs and environment_costs sum it per tag.
CREATE OR REPLACE VIEW gpuledger.focus_hourly_charges AS
SELECT
    hour, gpu_uuid, node, gpu_model, mig_profile, job_id, team, project, job_type, experiment_id,
    provider, region, pricing_model,
    sum(c.rows) AS live_rows,
    sum(c.gpu_seconds) AS gpu_seconds,
    sum(c.cost_usd) AS cost_usd,
    sum(c.idle_cost_usd) AS idle_cost_usd,
    sum(c.util_gpu_seconds) AS util_gpu_seconds,
    sum(c.util_sm_seconds) AS util_sm_seconds,
    sum(c.price_missing_gpu_seconds) AS price_missing_gpu_seconds,
    model,
    environment,
    sum(c.sm_gpu_seconds) AS sm_gpu_seconds,
    sum(c.sm_active_seconds) AS sm_active_seconds
FROM gpuledger.cost_job_gpu_hour_between(
    start = {start:DateTime64(3, 'UTC')}, end = {end:DateTime64(3, 'UTC')}) AS c
GROUP BY hour, gpu_uuid, node, gpu_model, mig_profile, job_id, team, project, job_type,
    experiment_id, provider, region, pricing_model, model, environment
HAVING live_rows != 0;
