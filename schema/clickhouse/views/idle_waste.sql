-- What idle allocated GPU time cost, per team, project and day: sums only, exact from the
-- job, GPU and hour rollup.
CREATE OR REPLACE VIEW gpuledger.idle_waste AS
SELECT
    team, project, job_id, gpu_uuid, node,
    sum(c.gpu_seconds) AS gpu_seconds,
    sum(c.cost_usd) AS cost_usd,
    sum(c.idle_gpu_seconds) AS idle_gpu_seconds,
    sum(c.idle_cost_usd) AS idle_cost_usd,
    if(gpu_seconds > 1e-9, idle_gpu_seconds / gpu_seconds, NULL) AS idle_share,
    if(cost_usd > 1e-12, idle_cost_usd / cost_usd, NULL) AS wasted_share
FROM gpuledger.cost_job_gpu_hour AS c
WHERE c.allocated = 1
GROUP BY team, project, job_id, gpu_uuid, node
HAVING sum(c.rows) != 0;
