-- The same per ISO week (Monday, UTC): spend in the week it was incurred, jobs in the week
-- they ended (ended_at, or updated_at for a finished job that never sent one).
CREATE OR REPLACE VIEW gpuledger.project_effective_cost_weekly AS
WITH
    spend AS
    (
        SELECT
            toMonday(h.ts) AS week,
            h.project AS project,
            sum(h.cost_usd) AS total_spend_usd,
            sum(h.util_gpu_seconds) AS util_gpu_seconds,
            sum(h.util_sm_seconds) AS util_sm_seconds,
            sum(h.util_rows) AS util_rows,
            sum(h.price_missing_gpu_seconds) AS price_missing_gpu_seconds
        FROM gpuledger.cost_hour AS h
        WHERE h.allocated = 1
        GROUP BY week, project
        HAVING sum(h.rows) != 0
    ),
    -- GPM's SM activity: the minute and hour rollups do not sum it, the charges view does.
    activity AS
    (
        SELECT
            toMonday(a.hour) AS week,
            a.project AS project,
            sum(a.sm_gpu_seconds) AS sm_gpu_seconds,
            sum(a.sm_active_seconds) AS sm_active_seconds
        FROM gpuledger.focus_hourly_charges(
            start = toDateTime64(0, 3, 'UTC'), end = toDateTime64(4102444800, 3, 'UTC')) AS a
        WHERE a.job_id != ''
        GROUP BY week, project
    ),
    outcomes AS
    (
        SELECT
            toMonday(ifNull(j.ended_at, j.updated_at)) AS week,
            j.project AS project,
            count() AS jobs_finished,
            countIf(j.state = 'succeeded') AS jobs_succeeded
        FROM gpuledger.jobs AS j FINAL
        WHERE j.state IN ('succeeded', 'failed', 'preempted', 'cancelled')
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
