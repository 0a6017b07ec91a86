-- SM activity in the minute and hour rollups (004), as 075 adds it to the job, GPU and hour
-- rollup: `sm_gpu_seconds` and `sm_active_seconds`, with the materialized views re-created to
-- fill them. A template the runner renders once per rollup (RENDERINGS in schema/migrate.py).
-- Facts stored before 075 have no SM activity: nothing to backfill. Migrate while no worker
-- writes (see 075).

ALTER TABLE gpuledger.${rollup}
    ADD COLUMN IF NOT EXISTS sm_gpu_seconds Float64 DEFAULT 0 AFTER util_sm_seconds,
    ADD COLUMN IF NOT EXISTS sm_active_seconds Float64 DEFAULT 0 AFTER sm_gpu_seconds;

DROP VIEW IF EXISTS gpuledger.${rollup}_mv;

CREATE MATERIALIZED VIEW IF NOT EXISTS gpuledger.${rollup}_mv TO gpuledger.${rollup} AS
SELECT
    ${bucket}(f.ts) AS ts,
    f.node AS node,
    f.gpu_model AS gpu_model,
    f.job_id AS job_id,
    f.team AS team,
    f.project AS project,
    f.job_type AS job_type,
    f.experiment_id AS experiment_id,
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
    sum(toInt64(f.sign)) AS rows
FROM gpuledger.cost_facts AS f
GROUP BY ts, node, gpu_model, job_id, team, project, job_type, experiment_id, pricing_model, allocated;
