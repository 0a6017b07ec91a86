-- Inference endpoints (long-running inference jobs) per hour: what the GPUs cost and how
-- many requests came in. An hour with cost and no usage row has requests = 0: that is what
-- an idle endpoint looks like.
CREATE OR REPLACE VIEW gpuledger.endpoint_hourly AS
WITH
    attributed AS
    (
        SELECT
            job_id, h.ts AS hour, team, project,
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
        GROUP BY job_id, hour, team, project
    ),
    cost AS
    (
        SELECT
            a.job_id AS job_id,
            a.hour AS hour,
            argMax(a.team, a.live) AS team,
            argMax(a.project, a.live) AS project,
            sum(a.cost_usd) AS cost_usd,
            sum(a.gpu_seconds) AS gpu_seconds,
            sum(a.idle_cost_usd) AS idle_cost_usd
        FROM attributed AS a
        GROUP BY job_id, hour
        HAVING sum(a.live) != 0
    ),
    used AS
    (
        SELECT
            u.job_id AS job_id,
            toStartOfHour(u.ts) AS hour,
            sum(u.requests) AS requests,
            sum(u.tokens) AS tokens
        FROM gpuledger.usage AS u
        WHERE u.ts >= toStartOfHour({start:DateTime64(3, 'UTC')})
            AND u.ts < {end:DateTime64(3, 'UTC')}
        GROUP BY job_id, hour
    )
SELECT
    c.job_id AS job_id,
    c.hour AS hour,
    c.team AS team,
    c.project AS project,
    c.cost_usd AS cost_usd,
    c.gpu_seconds AS gpu_seconds,
    c.idle_cost_usd AS idle_cost_usd,
    toUInt64(ifNull(u.requests, 0)) AS requests,
    toUInt64(ifNull(u.tokens, 0)) AS tokens
FROM cost AS c
LEFT JOIN used AS u ON u.job_id = c.job_id AND u.hour = c.hour;
