-- Per inference endpoint and UTC day in a window [start, end): what its GPUs cost, how many
-- requests came in, what they were worth (endpoint_value, the value in force at each hour)
-- and the margin. An endpoint loses money on a day when the cost of 1,000 requests exceeds
-- their value: margin_usd < 0. value_usd and margin_usd are NULL unless every costed hour of
-- the day has a value in force (a margin over part of the day would look better than it is).
CREATE OR REPLACE VIEW gpuledger.endpoint_margin_daily AS
WITH
    hours AS
    (
        SELECT
            e.job_id AS job_id,
            e.hour AS hour,
            e.team AS team,
            e.project AS project,
            e.cost_usd AS cost_usd,
            e.requests AS requests,
            toDateTime64(e.hour, 3, 'UTC') AS at
        FROM gpuledger.endpoint_hourly(
            start = {start:DateTime64(3, 'UTC')}, end = {end:DateTime64(3, 'UTC')}) AS e
    ),
    valued AS
    (
        SELECT
            h.job_id AS job_id,
            h.hour AS hour,
            h.team AS team,
            h.project AS project,
            h.cost_usd AS cost_usd,
            h.requests AS requests,
            v.endpoint != '' AS has_value,
            h.requests * v.usd_per_1k_requests / 1000 AS value_usd
        FROM hours AS h
        ASOF LEFT JOIN
        (
            SELECT x.endpoint AS endpoint, x.effective_from AS effective_from,
                x.usd_per_1k_requests AS usd_per_1k_requests
            FROM gpuledger.endpoint_value AS x FINAL
        ) AS v ON v.endpoint = h.job_id AND h.at >= v.effective_from
    )
SELECT
    d.job_id AS endpoint,
    toDate(d.hour) AS day,
    argMax(d.team, d.hour) AS team,
    argMax(d.project, d.hour) AS project,
    toUInt64(sum(d.requests)) AS requests,
    sum(d.cost_usd) AS cost_usd,
    if(sum(d.requests) > 0, 1000 * sum(d.cost_usd) / sum(d.requests), NULL)
        AS cost_per_1k_requests,
    if(min(d.has_value) = 1 AND sum(d.requests) > 0, 1000 * sum(d.value_usd) / sum(d.requests),
        NULL) AS value_per_1k_requests,
    if(min(d.has_value) = 1, sum(d.value_usd), NULL) AS value_usd,
    if(min(d.has_value) = 1, sum(d.value_usd) - sum(d.cost_usd), NULL) AS margin_usd
FROM valued AS d
GROUP BY endpoint, day;
