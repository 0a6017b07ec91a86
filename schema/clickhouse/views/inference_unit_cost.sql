-- What 1,000 inferences cost (docs/ARCHITECTURE.md §3), per inference job and UTC day: cost
-- from the hour rollup, volume from usage. A job is an inference job when its facts or its
-- jobs row say so; usage rows always count (only inference jobs send them).
-- usd_per_1k_requests is NULL on a day without requests, usd_per_1m_tokens on a day without
-- tokens.
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
