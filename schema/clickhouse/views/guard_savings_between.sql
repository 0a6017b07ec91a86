-- Dollars saved by the guard per month, team and policy, over the decisions taken in a window
-- [start, end): what the GPUs it acted on would have gone on costing (until the job's own
-- end, or the policy's horizon). Dry runs count apart: what enforcing the policies would
-- have saved.
CREATE OR REPLACE VIEW gpuledger.guard_savings_between AS
SELECT
    toStartOfMonth(a.decided_at) AS month,
    a.team AS team,
    a.policy AS policy,
    countIf(a.dry_run = 0 AND a.outcome = 'done') AS actions,
    sumIf(a.usd_at_stake, a.dry_run = 0 AND a.outcome = 'done') AS saved_usd,
    countIf(a.dry_run = 1) AS dry_runs,
    sumIf(a.usd_at_stake, a.dry_run = 1) AS would_save_usd
FROM gpuledger.guard_actions AS a
WHERE a.kind = 'act'
    AND a.decided_at >= {start:DateTime64(3, 'UTC')} AND a.decided_at < {end:DateTime64(3, 'UTC')}
GROUP BY month, team, policy;
