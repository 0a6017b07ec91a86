-- Dollars saved by the guard per team and month: what the GPUs it acted on would have gone on
-- costing (until the job's own end, or the policy's horizon). Dry runs count apart: what
-- enforcing the policies would have saved.
CREATE OR REPLACE VIEW gpuledger.guard_savings AS
SELECT
    toStartOfMonth(decided_at) AS month,
    team,
    policy,
    countIf(dry_run = 0 AND outcome = 'done') AS actions,
    sumIf(usd_at_stake, dry_run = 0 AND outcome = 'done') AS saved_usd,
    countIf(dry_run = 1) AS dry_runs,
    sumIf(usd_at_stake, dry_run = 1) AS would_save_usd
FROM gpuledger.guard_actions
WHERE kind = 'act'
GROUP BY month, team, policy;
