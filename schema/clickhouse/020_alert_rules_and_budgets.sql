-- Alerting: which rule raised an alert, and the budgets that budget_burn alerts
-- watch.
--
-- `rule` tells apart the alerts of one scope: a team's budget raises `mtd_50`, `mtd_80`,
-- `mtd_100` (month-to-date spend crossed that share of the budget) and `burn_rate` (the last
-- hour's spend, extrapolated to the month's end, exceeds the budget), each with its own
-- firing and resolved rows. Idle allocated GPU alerts leave it empty: their scope is the
-- (GPU, job) pair.

ALTER TABLE gpuledger.alerts ADD COLUMN IF NOT EXISTS rule LowCardinality(String) DEFAULT '' AFTER kind;

-- Monthly budgets in USD, loaded by `gpuledger budgets load FILE`. `month` is 'YYYY-MM' or
-- '*' (every month without its own row); an empty team or project matches any. The latest
-- load of a (month, team, project) wins; `active = 0` is a budget removed by a later load.
CREATE TABLE IF NOT EXISTS gpuledger.budgets
(
    month LowCardinality(String),
    team LowCardinality(String),
    project LowCardinality(String),
    budget_usd Float64,
    active UInt8,
    source String,
    loaded_at DateTime64(3, 'UTC')
)
ENGINE = ReplacingMergeTree(loaded_at)
ORDER BY (month, team, project);
