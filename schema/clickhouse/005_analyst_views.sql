-- Views for analysts (DESIGN.md §4.7, §4.8, §5).
--
-- Every measure is Σ value * sign, so that cancel (-1) and restate (+1) rows net out.
-- Means are time-weighted over the rows that have a util_sm:
--   Σ util_sm * duration_s * share * sign / Σ duration_s * share * sign,
-- NULL where no live row has one. Groups whose facts were all cancelled are dropped with
-- `sum(rows) != 0` (an exact integer, unlike the float sums).
-- Views read the rollups where that is exact (no per-GPU or per-sample detail needed).
-- Columns are qualified with their table's alias so that an output alias equal to a
-- column name (cost_usd) never shadows the column inside its own aggregate.

-- One row per job that has live GPU time. Attribution columns come from the facts (what
-- was charged), falling back to the jobs table where the facts have none; state, started_at
-- and ended_at come from jobs FINAL ('' and NULL while the job is unknown there).
CREATE OR REPLACE VIEW gpuledger.job_costs AS
WITH
    per_sample AS
    (
        -- One group per (job, GPU, sample time, attribution): live = 0 where cancelled.
        SELECT
            f.job_id AS job_id,
            f.gpu_uuid AS gpu_uuid,
            f.ts AS ts,
            f.team AS team,
            f.project AS project,
            f.job_type AS job_type,
            f.experiment_id AS experiment_id,
            sum(toInt64(f.sign)) AS live,
            sum(toFloat64(f.duration_s) * f.share * f.sign) AS gpu_seconds,
            sum(f.cost_usd * f.sign) AS cost_usd,
            sum(f.idle_cost_usd * f.sign) AS idle_cost_usd,
            sumIf(toFloat64(f.duration_s) * f.share * f.sign, f.util_sm IS NOT NULL)
                AS util_gpu_seconds,
            sumIf(toFloat64(assumeNotNull(f.util_sm)) * f.duration_s * f.share * f.sign,
                f.util_sm IS NOT NULL) AS util_sm_seconds,
            sumIf(toInt64(f.sign), f.util_sm IS NOT NULL) AS util_rows
        FROM gpuledger.cost_facts AS f
        WHERE f.job_id != ''
        GROUP BY job_id, gpu_uuid, ts, team, project, job_type, experiment_id
    ),
    per_job AS
    (
        SELECT
            p.job_id AS job_id,
            argMaxIf(p.team, p.ts, p.live > 0) AS fact_team,
            argMaxIf(p.project, p.ts, p.live > 0) AS fact_project,
            argMaxIf(p.job_type, p.ts, p.live > 0) AS fact_job_type,
            argMaxIf(p.experiment_id, p.ts, p.live > 0) AS fact_experiment_id,
            minIf(p.ts, p.live > 0) AS first_ts,
            maxIf(p.ts, p.live > 0) AS last_ts,
            sum(p.gpu_seconds) AS gpu_seconds,
            sum(p.cost_usd) AS cost_usd,
            sum(p.idle_cost_usd) AS idle_cost_usd,
            sum(p.util_gpu_seconds) AS util_gpu_seconds,
            sum(p.util_sm_seconds) AS util_sm_seconds,
            sum(p.util_rows) AS util_rows,
            uniqExactIf(p.gpu_uuid, p.live > 0) AS gpus
        FROM per_sample AS p
        GROUP BY job_id
        HAVING sum(p.live) != 0
    ),
    job_state AS
    (
        SELECT
            j.job_id AS job_id,
            j.state AS state,
            j.team AS team,
            j.project AS project,
            j.job_type AS job_type,
            j.experiment_id AS experiment_id,
            j.started_at AS started_at,
            j.ended_at AS ended_at
        FROM gpuledger.jobs AS j FINAL
    )
SELECT
    c.job_id AS job_id,
    if(c.fact_team != '', c.fact_team, ifNull(s.team, '')) AS team,
    if(c.fact_project != '', c.fact_project, ifNull(s.project, '')) AS project,
    if(c.fact_job_type != '', c.fact_job_type, ifNull(s.job_type, '')) AS job_type,
    if(c.fact_experiment_id != '', c.fact_experiment_id, ifNull(s.experiment_id, ''))
        AS experiment_id,
    ifNull(s.state, '') AS state,
    s.started_at AS started_at,
    s.ended_at AS ended_at,
    c.first_ts AS first_ts,
    c.last_ts AS last_ts,
    c.gpu_seconds AS gpu_seconds,
    c.gpu_seconds / 3600 AS gpu_hours,
    c.cost_usd AS cost_usd,
    c.idle_cost_usd AS idle_cost_usd,
    if(c.util_rows > 0 AND c.util_gpu_seconds > 0, c.util_sm_seconds / c.util_gpu_seconds, NULL)
        AS mean_util_sm,
    c.gpus AS gpus
FROM per_job AS c
LEFT JOIN job_state AS s ON s.job_id = c.job_id;

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

-- DESIGN.md §4.7 per project over all time. TotalSpend is allocated cost;
-- JobSuccessRate = succeeded / finished jobs (jobs FINAL); ResourceUtilization is the
-- time-weighted mean util_sm over allocated GPU time. effective_cost_usd is NULL when no
-- job succeeded or utilization is (numerically) 0: an infinite cost is never shown as a
-- number. The 1e-9 floor absorbs float residue left by cancel and restate.
CREATE OR REPLACE VIEW gpuledger.project_effective_cost AS
WITH
    spend AS
    (
        SELECT
            h.project AS project,
            sum(h.cost_usd) AS total_spend_usd,
            sum(h.util_gpu_seconds) AS util_gpu_seconds,
            sum(h.util_sm_seconds) AS util_sm_seconds,
            sum(h.util_rows) AS util_rows
        FROM gpuledger.cost_hour AS h
        WHERE h.allocated = 1
        GROUP BY project
        HAVING sum(h.rows) != 0
    ),
    outcomes AS
    (
        SELECT
            j.project AS project,
            count() AS jobs_finished,
            countIf(j.state = 'succeeded') AS jobs_succeeded
        FROM gpuledger.jobs AS j FINAL
        WHERE j.state IN ('succeeded', 'failed', 'preempted', 'cancelled')
        GROUP BY project
    ),
    joined AS
    (
        SELECT
            project,
            ifNull(s.total_spend_usd, 0) AS total_spend_usd,
            toUInt64(ifNull(o.jobs_finished, 0)) AS jobs_finished,
            toUInt64(ifNull(o.jobs_succeeded, 0)) AS jobs_succeeded,
            if(jobs_finished > 0, jobs_succeeded / jobs_finished, NULL) AS job_success_rate,
            if(ifNull(s.util_rows, 0) > 0 AND ifNull(s.util_gpu_seconds, 0) > 0,
                s.util_sm_seconds / s.util_gpu_seconds, NULL) AS resource_utilization
        FROM spend AS s
        FULL OUTER JOIN outcomes AS o USING (project)
    )
SELECT
    project,
    total_spend_usd,
    jobs_finished,
    jobs_succeeded,
    job_success_rate,
    resource_utilization,
    if(jobs_succeeded > 0 AND resource_utilization > 1e-9,
        total_spend_usd / (job_success_rate * resource_utilization), NULL) AS effective_cost_usd
FROM joined;

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
            sum(h.util_rows) AS util_rows
        FROM gpuledger.cost_hour AS h
        WHERE h.allocated = 1
        GROUP BY week, project
        HAVING sum(h.rows) != 0
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
            toUInt64(ifNull(o.jobs_finished, 0)) AS jobs_finished,
            toUInt64(ifNull(o.jobs_succeeded, 0)) AS jobs_succeeded,
            if(jobs_finished > 0, jobs_succeeded / jobs_finished, NULL) AS job_success_rate,
            if(ifNull(s.util_rows, 0) > 0 AND ifNull(s.util_gpu_seconds, 0) > 0,
                s.util_sm_seconds / s.util_gpu_seconds, NULL) AS resource_utilization
        FROM spend AS s
        FULL OUTER JOIN outcomes AS o USING (week, project)
    )
SELECT
    week,
    project,
    total_spend_usd,
    jobs_finished,
    jobs_succeeded,
    job_success_rate,
    resource_utilization,
    if(jobs_succeeded > 0 AND resource_utilization > 1e-9,
        total_spend_usd / (job_success_rate * resource_utilization), NULL) AS effective_cost_usd
FROM joined;

-- DESIGN.md §4.8 per inference job and UTC day: cost from the hour rollup, volume from
-- usage. A job is an inference job when its facts or its jobs row say so; usage rows
-- always count (only inference jobs send them). usd_per_1k_requests is NULL on a day
-- without requests, usd_per_1m_tokens on a day without tokens.
CREATE OR REPLACE VIEW gpuledger.inference_unit_cost AS
WITH
    attributed AS
    (
        SELECT
            h.job_id AS job_id,
            toDate(h.ts) AS day,
            h.team AS team,
            h.project AS project,
            sum(h.cost_usd) AS cost_usd,
            sum(h.rows) AS live
        FROM gpuledger.cost_hour AS h
        WHERE h.job_id != ''
            AND (h.job_type = 'inference' OR h.job_id IN (
                SELECT i.job_id FROM gpuledger.jobs AS i FINAL WHERE i.job_type = 'inference'))
        GROUP BY job_id, day, team, project
    ),
    cost AS
    (
        SELECT
            a.job_id AS job_id,
            a.day AS day,
            argMax(a.team, a.live) AS team,
            argMax(a.project, a.live) AS project,
            sum(a.cost_usd) AS cost_usd
        FROM attributed AS a
        GROUP BY job_id, day
        HAVING sum(a.live) != 0
    ),
    used AS
    (
        SELECT
            u.job_id AS job_id,
            toDate(u.ts) AS day,
            sum(u.requests) AS requests,
            sum(u.tokens) AS tokens
        FROM gpuledger.usage AS u
        GROUP BY job_id, day
    ),
    job_meta AS
    (
        SELECT m.job_id AS job_id, m.team AS team, m.project AS project
        FROM gpuledger.jobs AS m FINAL
    ),
    joined AS
    (
        SELECT
            job_id,
            day,
            ifNull(c.team, '') AS cost_team,
            ifNull(c.project, '') AS cost_project,
            ifNull(c.cost_usd, 0) AS cost_usd,
            toUInt64(ifNull(u.requests, 0)) AS requests,
            toUInt64(ifNull(u.tokens, 0)) AS tokens
        FROM cost AS c
        FULL OUTER JOIN used AS u USING (job_id, day)
    )
SELECT
    x.job_id AS job_id,
    if(x.cost_team != '', x.cost_team, ifNull(m.team, '')) AS team,
    if(x.cost_project != '', x.cost_project, ifNull(m.project, '')) AS project,
    x.day AS day,
    x.cost_usd AS cost_usd,
    x.requests AS requests,
    x.tokens AS tokens,
    if(x.requests > 0, 1000 * x.cost_usd / x.requests, NULL) AS usd_per_1k_requests,
    if(x.tokens > 0, 1000000 * x.cost_usd / x.tokens, NULL) AS usd_per_1m_tokens
FROM joined AS x
LEFT JOIN job_meta AS m ON m.job_id = x.job_id;

-- Idle allocated GPU time per team, project, job, GPU and node (allocated rows only).
-- idle_gpu_seconds is the time below the idle threshold (idle = 1); idle_cost_usd is the
-- cost of the unused capacity, cost_usd * (1 - util_sm); wasted_share = idle_cost_usd /
-- cost_usd and idle_share = idle_gpu_seconds / gpu_seconds (NULL when the divisor is 0).
CREATE OR REPLACE VIEW gpuledger.idle_waste AS
SELECT
    f.team AS team,
    f.project AS project,
    f.job_id AS job_id,
    f.gpu_uuid AS gpu_uuid,
    f.node AS node,
    sum(toFloat64(f.duration_s) * f.share * f.sign) AS gpu_seconds,
    sum(f.cost_usd * f.sign) AS cost_usd,
    sum(toFloat64(f.duration_s) * f.share * f.idle * f.sign) AS idle_gpu_seconds,
    sum(f.idle_cost_usd * f.sign) AS idle_cost_usd,
    if(gpu_seconds > 1e-9, idle_gpu_seconds / gpu_seconds, NULL) AS idle_share,
    if(cost_usd > 1e-12, idle_cost_usd / cost_usd, NULL) AS wasted_share
FROM gpuledger.cost_facts AS f
WHERE f.allocated = 1
GROUP BY team, project, job_id, gpu_uuid, node
HAVING sum(toInt64(f.sign)) != 0;
