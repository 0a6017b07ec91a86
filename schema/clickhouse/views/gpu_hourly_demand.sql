-- GPU demand per hour and model (the recommendations' reserved-capacity input): sums only,
-- exact from the job, GPU and hour rollup (cost_job_gpu_hour_between).
CREATE OR REPLACE VIEW gpuledger.gpu_hourly_demand AS
SELECT
    d.hour AS hour,
    d.provider AS provider,
    d.region AS region,
    d.gpu_model AS gpu_model,
    d.mig_profile AS mig_profile,
    d.pricing_model AS pricing_model,
    sum(d.gpu_seconds) / 3600 AS gpus,
    sum(d.cost_usd) AS cost_usd
FROM gpuledger.cost_job_gpu_hour_between(
    start = {start:DateTime64(3, 'UTC')}, end = {end:DateTime64(3, 'UTC')}) AS d
GROUP BY hour, provider, region, gpu_model, mig_profile, pricing_model
HAVING sum(d.rows) != 0;
