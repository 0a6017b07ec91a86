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
    MODIFY ORDER BY (${job_gpu_hour_key}, model, environment);

ALTER TABLE gpuledger.cost_job_gpu_hour_mv MODIFY QUERY
SELECT
    toStartOfHour(f.ts) AS hour,
    ${job_gpu_hour_attribution},
    f.model AS model,
    f.environment AS environment,
    ${rollup_sums},
    sumIf(toFloat64(f.duration_s) * f.share * f.sign, f.sm_active IS NOT NULL) AS sm_gpu_seconds,
    sumIf(toFloat64(assumeNotNull(f.sm_active)) * f.duration_s * f.share * f.sign,
        f.sm_active IS NOT NULL) AS sm_active_seconds,
    ${job_gpu_hour_detail}
FROM gpuledger.cost_facts AS f
GROUP BY ${job_gpu_hour_key}, model, environment;
