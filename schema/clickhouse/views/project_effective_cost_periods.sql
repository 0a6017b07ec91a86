-- EffectiveCost = TotalSpend / (JobSuccessRate x ResourceUtilization) per project and period
-- (docs/ARCHITECTURE.md §3) over a window [start, end): per ISO week (Monday, UTC) where
-- weekly = 1, else over the window as a whole (week 1970-01-01). Spend counts in the period it
-- was incurred, jobs in the period they ended (ended_at, or updated_at for a finished job that
-- never sent one). TotalSpend is allocated cost; JobSuccessRate = succeeded / finished jobs
-- (jobs FINAL); ResourceUtilization is the time-weighted mean util_sm (NVML's busy time) over
-- allocated GPU time; sm_utilization the same mean of GPM's SM activity over the allocated GPU
-- time that has one, and effective_cost_sm_usd EffectiveCost with it (NULL where no GPU has
-- GPM). effective_cost_usd is NULL when no job succeeded or utilization is (numerically) 0: an
-- infinite cost is never shown as a number; the 1e-9 floor absorbs float residue left by
-- cancel and restate. It is NULL too when some allocated GPU time had no price
-- (unpriced_gpu_hours > 0): a TotalSpend that leaves those hours out would look cheap.
CREATE OR REPLACE VIEW gpuledger.project_effective_cost_periods AS
WITH
    -- The window's whole hours: cost_hour serves them, cost_minute the minutes around them.
    if(toStartOfHour({start:DateTime64(3, 'UTC')}) = {start:DateTime64(3, 'UTC')},
        toStartOfHour({start:DateTime64(3, 'UTC')}),
        toStartOfHour({start:DateTime64(3, 'UTC')}) + toIntervalHour(1)) AS hours_from,
    toStartOfHour({end:DateTime64(3, 'UTC')}) AS hours_to,
    spend AS
    (
        SELECT
            if({weekly:UInt8} = 1, toMonday(h.ts), toDate(0)) AS week,
            h.project AS project,
            sum(h.cost_usd) AS total_spend_usd,
            sum(h.util_gpu_seconds) AS util_gpu_seconds,
            sum(h.util_sm_seconds) AS util_sm_seconds,
            sum(h.util_rows) AS util_rows,
            sum(h.price_missing_gpu_seconds) AS price_missing_gpu_seconds
        FROM
        (
            SELECT * FROM gpuledger.cost_hour AS o WHERE o.ts >= hours_from AND o.ts < hours_to
            UNION ALL
            SELECT *
            FROM gpuledger.cost_minute AS m
            WHERE m.ts >= {start:DateTime64(3, 'UTC')} AND m.ts < {end:DateTime64(3, 'UTC')}
                AND (m.ts < hours_from OR m.ts >= hours_to)
        ) AS h
        WHERE h.allocated = 1
        GROUP BY week, project
        HAVING sum(h.rows) != 0
    ),
    -- GPM's SM activity: the minute and hour rollups do not sum it, the charges view does.
    activity AS
    (
        SELECT
            if({weekly:UInt8} = 1, toMonday(a.hour), toDate(0)) AS week,
            a.project AS project,
            sum(a.sm_gpu_seconds) AS sm_gpu_seconds,
            sum(a.sm_active_seconds) AS sm_active_seconds
        FROM gpuledger.focus_hourly_charges(
            start = {start:DateTime64(3, 'UTC')}, end = {end:DateTime64(3, 'UTC')}) AS a
        WHERE a.job_id != ''
        GROUP BY week, project
    ),
    outcomes AS
    (
        SELECT
            if({weekly:UInt8} = 1, toMonday(ifNull(j.ended_at, j.updated_at)), toDate(0)) AS week,
            j.project AS project,
            count() AS jobs_finished,
            countIf(j.state = 'succeeded') AS jobs_succeeded
        FROM gpuledger.jobs AS j FINAL
        WHERE j.state IN ('succeeded', 'failed', 'preempted', 'cancelled')
            AND ifNull(j.ended_at, j.updated_at) >= {start:DateTime64(3, 'UTC')}
            AND ifNull(j.ended_at, j.updated_at) < {end:DateTime64(3, 'UTC')}
        GROUP BY week, project
    ),
    joined AS
    (
        SELECT
            week,
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
        FULL OUTER JOIN outcomes AS o USING (week, project)
        LEFT JOIN activity AS a USING (week, project)
    )
SELECT
    week,
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
