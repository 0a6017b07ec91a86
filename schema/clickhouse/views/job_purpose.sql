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
    c.idle_cost_usd AS idle_cost_usd,
    c.model AS model,
    c.environment AS environment
FROM gpuledger.job_costs AS c
LEFT JOIN
(
    SELECT l.job_id AS job_id, l.labels['purpose'] AS purpose_label
    FROM gpuledger.jobs AS l FINAL
) AS j ON j.job_id = c.job_id;
