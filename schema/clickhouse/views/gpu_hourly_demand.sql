-- GPU demand per hour and model (the recommendations' reserved-capacity input): sums only,
-- exact from the job, GPU and hour rollup.
CREATE OR REPLACE VIEW gpuledger.gpu_hourly_demand AS
WITH
    -- The hours the rollup serves; the rest of the window comes from cost_facts.
    (SELECT rollup_from FROM gpuledger.rollup_span(
        start = {start:DateTime64(3, 'UTC')}, end = {end:DateTime64(3, 'UTC')})) AS rollup_from,
    (SELECT rollup_to FROM gpuledger.rollup_span(
        start = {start:DateTime64(3, 'UTC')}, end = {end:DateTime64(3, 'UTC')})) AS rollup_to,
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
