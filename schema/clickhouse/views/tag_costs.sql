-- Cost per tag over a window [start, end): one row per tag (`model`, `environment`) and value
-- ('' = jobs without that tag), allocated GPU time only, from focus_hourly_charges (exact from
-- the rollup, cut to the window). Utilization means are weighted by GPU seconds: busy time
-- over the rows that measured one, SM activity over the rows of GPUs with GPM (NULL where
-- none had it). model_costs and environment_costs are its two halves.
CREATE OR REPLACE VIEW gpuledger.tag_costs AS
SELECT
    t.1 AS tag,
    t.2 AS value,
    sum(c.cost_usd) AS cost_usd,
    sum(c.idle_cost_usd) AS idle_cost_usd,
    sum(c.gpu_seconds) / 3600 AS gpu_hours,
    uniqExact(c.job_id) AS jobs,
    if(sum(c.util_gpu_seconds) > 1e-9, sum(c.util_sm_seconds) / sum(c.util_gpu_seconds), NULL)
        AS mean_util_sm,
    if(sum(c.sm_gpu_seconds) > 1e-9, sum(c.sm_active_seconds) / sum(c.sm_gpu_seconds), NULL)
        AS mean_sm_active,
    sum(c.price_missing_gpu_seconds) / 3600 AS unpriced_gpu_hours
FROM gpuledger.focus_hourly_charges(
    start = {start:DateTime64(3, 'UTC')}, end = {end:DateTime64(3, 'UTC')}) AS c
ARRAY JOIN [('model', c.model), ('environment', c.environment)] AS t
WHERE c.job_id != ''
GROUP BY tag, value;
