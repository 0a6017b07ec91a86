-- EffectiveCost = TotalSpend / (JobSuccessRate x ResourceUtilization) per project over a
-- window [start, end) (docs/ARCHITECTURE.md §3): spend in the window, jobs that ended in it.
-- TotalSpend is allocated cost; JobSuccessRate = succeeded / finished jobs (jobs FINAL);
-- ResourceUtilization is the time-weighted mean util_sm (NVML's busy time) over allocated GPU
-- time; sm_utilization the same mean of GPM's SM activity over the allocated GPU time that
-- has one, and effective_cost_sm_usd EffectiveCost with it (NULL where no GPU has GPM).
-- effective_cost_usd is NULL when no job succeeded or utilization is (numerically) 0: an
-- infinite cost is never shown as a number; the 1e-9 floor absorbs float residue left by
-- cancel and restate. It is NULL too when some allocated GPU time had no price
-- (unpriced_gpu_hours > 0): a TotalSpend that leaves those hours out would look cheap.
CREATE OR REPLACE VIEW gpuledger.project_effective_cost_between AS
WITH
    spend AS
    (
        SELECT
            h.project AS project,
            sum(h.cost_usd) AS total_spend_usd,
            sum(h.util_gpu_seconds) AS util_gpu_seconds,
            sum(h.util_sm_seconds) AS util_sm_seconds,
            sum(h.util_rows) AS util_rows,
            sum(h.price_missing_gpu_seconds) AS price_missing_gpu_seconds
        FROM gpuledger.cost_minute AS h
        WHERE h.allocated = 1
            AND h.ts >= {start:DateTime64(3, 'UTC')} AND h.ts < {end:DateTime64(3, 'UTC')}
        GROUP BY project
        HAVING sum(h.rows) != 0
    ),
    -- GPM's SM activity: the minute and hour rollups do not sum it, the charges view does.
    activity AS
    (
        SELECT
            a.project AS project,
            sum(a.sm_gpu_seconds) AS sm_gpu_seconds,
            sum(a.sm_active_seconds) AS sm_active_seconds
        FROM gpuledger.focus_hourly_charges(
            start = {start:DateTime64(3, 'UTC')}, end = {end:DateTime64(3, 'UTC')}) AS a
        WHERE a.job_id != ''
        GROUP BY project
    ),
    outcomes AS
    (
        SELECT
            j.project AS project,
            count() AS jobs_finished,
            countIf(j.state = 'succeeded') AS jobs_succeeded
        FROM gpuledger.jobs AS j FINAL
        WHERE j.state IN ('succeeded', 'failed', 'preempted', 'cancelled')
            AND ifNull(j.ended_at, j.updated_at) >= {start:DateTime64(3, 'UTC')}
            AND ifNull(j.ended_at, j.updated_at) < {end:DateTime64(3, 'UTC')}
        GROUP BY project
    ),
    joined AS
    (
        SELECT
            project,
            ifNull(s.total_spend_usd, 0) AS total_spend_usd,
            ifNull(s.price_missing_gpu_seconds, 0) / 3600 AS unpriced_gpu_hours,
            toUInt64(ifNull(o.jobs_finished, 0)) AS jobs_finished,
            toUInt64(ifNull(o.jobs_succeeded, 0)) AS jobs_succeeded,
            if(jobs_finished > 0, jobs_succeeded / jobs_finished, NULL) AS job_success_rate,
            if(ifNull(s.util_rows, 0) > 0 AND ifNull(s.util_gpu_seconds, 0) > 0,
                s.util_sm_seconds / s.util_gpu_seconds, NULL) AS resource_utilization,
            if(ifNull(a.sm_gpu_seconds, 0) > 1e-9, a.sm_active_seconds / a.sm_gpu_seconds, NULL)
                AS sm_utilization
        FROM spend AS s
        FULL OUTER JOIN outcomes AS o USING (project)
        LEFT JOIN activity AS a USING (project)
    )
SELECT
    project,
    total_spend_usd,
    jobs_finished,
    jobs_succeeded,
    job_success_rate,
    resource_utilization,
    if(jobs_succeeded > 0 AND resource_utilization > 1e-9 AND unpriced_gpu_hours <= 1e-9,
        total_spend_usd / (job_success_rate * resource_utilization), NULL) AS effective_cost_usd,
    unpriced_gpu_hours,
    sm_utilization,
    if(jobs_succeeded > 0 AND sm_utilization > 1e-9 AND unpriced_gpu_hours <= 1e-9,
        total_spend_usd / (job_success_rate * sm_utilization), NULL) AS effective_cost_sm_usd
FROM joined;
