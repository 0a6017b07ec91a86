-- Model and environment tags (docs/ARCHITECTURE.md §2): what a job trains or serves
-- ("llama-3-70b") and where it runs ("prod", "staging", "dev"), beside team, project, job
-- type and experiment. The facts and the jobs carry them; the job, GPU and hour rollup keys
-- its rows by them too (a SummingMergeTree keeps only its key's text columns), so job_costs,
-- job_resource_profile, focus_hourly_charges, model_costs and environment_costs read them
-- there. The new key columns go last, added (without a default expression: '' is a
-- String's own) in the statement that extends the key, as ClickHouse requires. The rollup's
-- view gets, in place (MODIFY QUERY: no insert misses it), a query that fills them and 075's
-- SM activity sums. Rows stored before this file keep '' for both; a worker of the release
-- before writes no tags, so one still running while this file applies loses nothing.

ALTER TABLE gpuledger.cost_facts
    ADD COLUMN IF NOT EXISTS model LowCardinality(String) DEFAULT '' CODEC(ZSTD(3)),
    ADD COLUMN IF NOT EXISTS environment LowCardinality(String) DEFAULT '' CODEC(ZSTD(3));

ALTER TABLE gpuledger.jobs
    ADD COLUMN IF NOT EXISTS model LowCardinality(String) DEFAULT '' AFTER experiment_id,
    ADD COLUMN IF NOT EXISTS environment LowCardinality(String) DEFAULT '' AFTER model;

ALTER TABLE gpuledger.cost_job_gpu_hour
    ADD COLUMN IF NOT EXISTS model LowCardinality(String) AFTER allocated,
    ADD COLUMN IF NOT EXISTS environment LowCardinality(String) AFTER model,
    MODIFY ORDER BY (hour, job_id, gpu_uuid, node, gpu_model, mig_profile, team, project,
        job_type, experiment_id, provider, region, pricing_model, allocated, model, environment);

ALTER TABLE gpuledger.cost_job_gpu_hour_mv MODIFY QUERY
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
    f.model AS model,
    f.environment AS environment,
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
    sumIf(toFloat64(f.duration_s) * f.share * f.sign, f.sm_active IS NOT NULL) AS sm_gpu_seconds,
    sumIf(toFloat64(assumeNotNull(f.sm_active)) * f.duration_s * f.share * f.sign,
        f.sm_active IS NOT NULL) AS sm_active_seconds,
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
    experiment_id, provider, region, pricing_model, allocated, model, environment;
