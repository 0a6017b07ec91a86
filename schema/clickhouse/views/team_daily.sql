-- Per UTC day and team (team '' = unallocated GPU time).
CREATE OR REPLACE VIEW gpuledger.team_daily AS
SELECT
    toDate(h.ts) AS day,
    h.team AS team,
    sum(h.gpu_seconds) / 3600 AS gpu_hours,
    sum(h.cost_usd) AS cost_usd,
    sum(h.idle_cost_usd) AS idle_cost_usd,
    sumIf(h.cost_usd, h.allocated = 1) AS allocated_cost_usd,
    sum(h.price_missing_gpu_seconds) / 3600 AS price_missing_gpu_hours,
    if(sum(h.util_rows) > 0 AND sum(h.util_gpu_seconds) > 0,
        sum(h.util_sm_seconds) / sum(h.util_gpu_seconds), NULL) AS mean_util_sm
FROM gpuledger.cost_hour AS h
GROUP BY day, team
HAVING sum(h.rows) != 0;
