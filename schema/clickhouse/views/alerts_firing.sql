-- The alerts whose latest state per episode is firing: an episode is (kind, rule, GPU, job,
-- team, project), so that budget alerts (no GPU, no job) of different teams and rules do not
-- hide one another. On a tie in ts the resolution wins, so that a resolved episode never
-- shows as open. `rule` names the budget rule (mtd_50, mtd_80, mtd_100, burn_rate) or the idle
-- rule that raised the alert.
CREATE OR REPLACE VIEW gpuledger.alerts_firing AS
SELECT ts, kind, state, gpu_uuid, node, job_id, team, project, since, idle_seconds,
    wasted_usd, message, rule
FROM
(
    SELECT *
    FROM gpuledger.alerts
    ORDER BY ts DESC, state = 'resolved' DESC
    LIMIT 1 BY kind, rule, gpu_uuid, job_id, team, project
)
WHERE state = 'firing';
