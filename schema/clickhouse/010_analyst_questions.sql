-- Views behind the analysts' questions (docs/SQL.md), the FOCUS export and the
-- recommendations (issue 8).
--
-- As in 005: every measure is Σ value * sign. Where a row's attributes matter (peaks,
-- percentiles, the job a sample went to), rows are first grouped per sample and
-- attribution, and only groups with a live row (Σ sign > 0) count: a cancelled row and its
-- cancellation net to zero there, while its restated version stays.
-- Views named with (start, end) are parameterized: the window is applied to the facts
-- before aggregating, e.g.
--   SELECT * FROM gpuledger.job_resource_profile(start = '2026-11-01', end = '2026-12-01')

-- One row per job that has live GPU time, with its purpose: the job's `purpose` label when
-- set (e.g. `--label purpose=production` on scheduled retraining), else `production` for a
-- training job without an experiment_id, `research` for training, tuning and notebook jobs
-- with one (and for tuning and notebooks without), `serving` for inference, `data` for
-- data processing, `other` otherwise.
CREATE OR REPLACE VIEW gpuledger.job_purpose AS
SELECT
    c.job_id AS job_id,
    c.team AS team,
    c.project AS project,
    c.job_type AS job_type,
    c.experiment_id AS experiment_id,
    c.state AS state,
    multiIf(
        j.purpose_label != '', j.purpose_label,
        c.job_type = 'training' AND c.experiment_id = '', 'production',
        c.job_type IN ('training', 'tuning', 'notebook'), 'research',
        c.job_type = 'inference', 'serving',
        c.job_type = 'data_processing', 'data',
        'other') AS purpose,
    c.first_ts AS first_ts,
    c.last_ts AS last_ts,
    c.gpu_hours AS gpu_hours,
    c.cost_usd AS cost_usd,
    c.idle_cost_usd AS idle_cost_usd
FROM gpuledger.job_costs AS c
LEFT JOIN
(
    SELECT l.job_id AS job_id, l.labels['purpose'] AS purpose_label
    FROM gpuledger.jobs AS l FINAL
) AS j ON j.job_id = c.job_id;

-- Hourly charges per GPU (or MIG instance), job and price: the rows of the FOCUS export.
-- A fact belongs to the hour its ts falls in.
CREATE OR REPLACE VIEW gpuledger.focus_hourly_charges AS
SELECT
    toStartOfHour(f.ts) AS hour,
    f.gpu_uuid AS gpu_uuid,
    f.node AS node,
    f.gpu_model AS gpu_model,
    f.mig_profile AS mig_profile,
    f.job_id AS job_id,
    f.team AS team,
    f.project AS project,
    f.job_type AS job_type,
    f.experiment_id AS experiment_id,
    f.provider AS provider,
    f.region AS region,
    f.pricing_model AS pricing_model,
    sum(toInt64(f.sign)) AS live_rows,
    sum(toFloat64(f.duration_s) * f.share * f.sign) AS gpu_seconds,
    sum(f.cost_usd * f.sign) AS cost_usd,
    sum(f.idle_cost_usd * f.sign) AS idle_cost_usd,
    sumIf(toFloat64(f.duration_s) * f.share * f.sign, f.util_sm IS NOT NULL) AS util_gpu_seconds,
    sumIf(toFloat64(assumeNotNull(f.util_sm)) * f.duration_s * f.share * f.sign,
        f.util_sm IS NOT NULL) AS util_sm_seconds,
    sum(toFloat64(f.duration_s) * f.share * f.price_missing * f.sign) AS price_missing_gpu_seconds
FROM gpuledger.cost_facts AS f
WHERE f.ts >= {start:DateTime64(3, 'UTC')} AND f.ts < {end:DateTime64(3, 'UTC')}
GROUP BY hour, gpu_uuid, node, gpu_model, mig_profile, job_id, team, project, job_type,
    experiment_id, provider, region, pricing_model
HAVING live_rows != 0;

-- What right-sizing and spot advice rest on: per job, GPU model (and MIG profile) and price
-- (provider, region, pricing model) in the window, the GPU time, the cost, the peak memory
-- used on one GPU, the 95th percentile and maximum of util_sm (weighted by GPU time; NULL
-- for MIG instances, which report none), the job's state, run times and labels.
CREATE OR REPLACE VIEW gpuledger.job_resource_profile AS
WITH
    per_sample AS
    (
        SELECT
            f.job_id AS job_id,
            f.gpu_uuid AS gpu_uuid,
            f.ts AS ts,
            f.gpu_model AS gpu_model,
            f.mig_profile AS mig_profile,
            f.provider AS provider,
            f.region AS region,
            f.pricing_model AS pricing_model,
            f.team AS team,
            f.project AS project,
            f.job_type AS job_type,
            f.experiment_id AS experiment_id,
            sum(toInt64(f.sign)) AS live,
            sum(toFloat64(f.duration_s) * f.share * f.sign) AS gpu_seconds,
            sum(f.cost_usd * f.sign) AS cost_usd,
            sum(f.idle_cost_usd * f.sign) AS idle_cost_usd,
            max(f.util_sm) AS util_sm,
            max(f.mem_used_bytes) AS mem_used_bytes
        FROM gpuledger.cost_facts AS f
        WHERE f.job_id != ''
            AND f.ts >= {start:DateTime64(3, 'UTC')} AND f.ts < {end:DateTime64(3, 'UTC')}
        GROUP BY job_id, gpu_uuid, ts, gpu_model, mig_profile, provider, region, pricing_model,
            team, project, job_type, experiment_id
        HAVING live > 0
    ),
    per_job AS
    (
        SELECT
            p.job_id AS job_id,
            p.gpu_model AS gpu_model,
            p.mig_profile AS mig_profile,
            p.provider AS provider,
            p.region AS region,
            p.pricing_model AS pricing_model,
            argMax(p.team, p.ts) AS fact_team,
            argMax(p.project, p.ts) AS fact_project,
            argMax(p.job_type, p.ts) AS fact_job_type,
            argMax(p.experiment_id, p.ts) AS fact_experiment_id,
            uniqExact(p.gpu_uuid) AS gpus,
            min(p.ts) AS first_ts,
            max(p.ts) AS last_ts,
            sum(p.gpu_seconds) AS gpu_seconds,
            sum(p.cost_usd) AS cost_usd,
            sum(p.idle_cost_usd) AS idle_cost_usd,
            max(p.mem_used_bytes) AS peak_mem_bytes,
            quantileExactWeighted(0.95)(p.util_sm, toUInt64(round(p.gpu_seconds * 1000)))
                AS p95_util_sm,
            max(p.util_sm) AS max_util_sm,
            if(sumIf(p.gpu_seconds, p.util_sm IS NOT NULL) > 0,
                sumIf(assumeNotNull(p.util_sm) * p.gpu_seconds, p.util_sm IS NOT NULL)
                    / sumIf(p.gpu_seconds, p.util_sm IS NOT NULL),
                NULL) AS mean_util_sm
        FROM per_sample AS p
        GROUP BY job_id, gpu_model, mig_profile, provider, region, pricing_model
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
            j.ended_at AS ended_at,
            j.labels AS labels
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
    s.labels AS labels,
    c.gpu_model AS gpu_model,
    c.mig_profile AS mig_profile,
    c.provider AS provider,
    c.region AS region,
    c.pricing_model AS pricing_model,
    c.gpus AS gpus,
    c.first_ts AS first_ts,
    c.last_ts AS last_ts,
    c.gpu_seconds AS gpu_seconds,
    c.gpu_seconds / 3600 AS gpu_hours,
    c.cost_usd AS cost_usd,
    c.idle_cost_usd AS idle_cost_usd,
    c.peak_mem_bytes AS peak_mem_bytes,
    c.p95_util_sm AS p95_util_sm,
    c.max_util_sm AS max_util_sm,
    c.mean_util_sm AS mean_util_sm
FROM per_job AS c
LEFT JOIN job_state AS s ON s.job_id = c.job_id;

-- GPUs in use per hour, price and GPU model (gpus = GPU-seconds / 3600; a MIG instance
-- counts its own seconds: weight it by its slice to get whole GPUs), allocated or not,
-- since an idle rented GPU is paid for too. Hours without any use have no row.
CREATE OR REPLACE VIEW gpuledger.gpu_hourly_demand AS
SELECT
    toStartOfHour(f.ts) AS hour,
    f.provider AS provider,
    f.region AS region,
    f.gpu_model AS gpu_model,
    f.mig_profile AS mig_profile,
    f.pricing_model AS pricing_model,
    sum(toFloat64(f.duration_s) * f.share * f.sign) / 3600 AS gpus,
    sum(f.cost_usd * f.sign) AS cost_usd
FROM gpuledger.cost_facts AS f
WHERE f.ts >= {start:DateTime64(3, 'UTC')} AND f.ts < {end:DateTime64(3, 'UTC')}
GROUP BY hour, provider, region, gpu_model, mig_profile, pricing_model
HAVING sum(toInt64(f.sign)) != 0;

-- Inference endpoints (long-running inference jobs) per hour: what the GPUs cost and how
-- many requests came in. An hour with cost and no usage row has requests = 0: that is what
-- an idle endpoint looks like.
CREATE OR REPLACE VIEW gpuledger.endpoint_hourly AS
WITH
    attributed AS
    (
        SELECT
            h.job_id AS job_id,
            h.ts AS hour,
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
