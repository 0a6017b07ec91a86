-- Inference jobs per job and hour (daily = 0) or UTC day (daily = 1, period at 00:00) over the
-- hours of a window [start, end): what their GPUs cost, from the hour rollup, and how many
-- requests and tokens came in, from usage. A job is an inference job when its facts or its
-- jobs row say so; usage rows always count (only inference jobs send them). team and project
-- are those of the period's most live rows ('' in a period without cost: costed = 0).
-- endpoint_hourly and inference_unit_cost read it.
CREATE OR REPLACE VIEW gpuledger.inference_cost AS
WITH
    attributed AS
    (
        SELECT
            h.job_id AS job_id,
            if({daily:UInt8} = 1, toStartOfDay(h.ts), h.ts) AS period,
            h.team AS team,
            h.project AS project,
            sum(h.cost_usd) AS cost_usd,
            sum(h.gpu_seconds) AS gpu_seconds,
            sum(h.idle_cost_usd) AS idle_cost_usd,
            sum(h.rows) AS live
        FROM gpuledger.cost_hour AS h
        WHERE h.job_id != ''
            AND h.ts >= toStartOfHour({start:DateTime64(3, 'UTC')})
            AND h.ts < {end:DateTime64(3, 'UTC')}
            AND (h.job_type = 'inference' OR h.job_id IN (
                SELECT i.job_id FROM gpuledger.jobs AS i FINAL WHERE i.job_type = 'inference'))
        GROUP BY job_id, period, team, project
    ),
    cost AS
    (
        SELECT
            a.job_id AS job_id,
            a.period AS period,
            argMax(a.team, a.live) AS team,
            argMax(a.project, a.live) AS project,
            sum(a.cost_usd) AS cost_usd,
            sum(a.gpu_seconds) AS gpu_seconds,
            sum(a.idle_cost_usd) AS idle_cost_usd,
            toUInt8(1) AS costed
        FROM attributed AS a
        GROUP BY job_id, period
        HAVING sum(a.live) != 0
    ),
    used AS
    (
        SELECT
            u.job_id AS job_id,
            toDateTime(if({daily:UInt8} = 1, toStartOfDay(u.ts), toStartOfHour(u.ts)), 'UTC')
                AS period,
            sum(u.requests) AS requests,
            sum(u.tokens) AS tokens
        FROM gpuledger.usage AS u
        WHERE u.ts >= toStartOfHour({start:DateTime64(3, 'UTC')})
            AND u.ts < {end:DateTime64(3, 'UTC')}
        GROUP BY job_id, period
    )
SELECT
    job_id,
    period,
    c.team AS team,
    c.project AS project,
    c.cost_usd AS cost_usd,
    c.gpu_seconds AS gpu_seconds,
    c.idle_cost_usd AS idle_cost_usd,
    toUInt64(ifNull(u.requests, 0)) AS requests,
    toUInt64(ifNull(u.tokens, 0)) AS tokens,
    ifNull(c.costed, 0) AS costed
FROM cost AS c
FULL OUTER JOIN used AS u USING (job_id, period);
