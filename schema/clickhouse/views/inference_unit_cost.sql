-- What 1,000 inferences cost (docs/ARCHITECTURE.md §3), per inference job and UTC day:
-- inference_cost per day, team and project falling back to the jobs table on a day without
-- cost. usd_per_1k_requests is NULL on a day without requests, usd_per_1m_tokens on a day
-- without tokens.
CREATE OR REPLACE VIEW gpuledger.inference_unit_cost AS
WITH
    job_meta AS
    (
        SELECT m.job_id AS job_id, m.team AS team, m.project AS project
        FROM gpuledger.jobs AS m FINAL
    )
SELECT
    x.job_id AS job_id,
    if(x.team != '', x.team, ifNull(m.team, '')) AS team,
    if(x.project != '', x.project, ifNull(m.project, '')) AS project,
    toDate(x.period) AS day,
    ifNull(x.cost_usd, 0) AS cost_usd,
    x.requests AS requests,
    x.tokens AS tokens,
    if(x.requests > 0, 1000 * x.cost_usd / x.requests, NULL) AS usd_per_1k_requests,
    if(x.tokens > 0, 1000000 * x.cost_usd / x.tokens, NULL) AS usd_per_1m_tokens
FROM gpuledger.inference_cost(
    start = toDateTime64(0, 3, 'UTC'), end = toDateTime64(4102444800, 3, 'UTC'), daily = 1) AS x
LEFT JOIN job_meta AS m ON m.job_id = x.job_id;
