-- The guard's audit trail: one row per step of a guardrail policy decided for an idle GPU,
-- whether carried out, announced, or only recorded as a dry run. The guard reads it back on
-- start, so a restart neither repeats nor skips a step (a step's identity is policy, target,
-- step). `outcome` says what happened: dry_run, notified, done, failed: REASON.
CREATE TABLE IF NOT EXISTS gpuledger.guard_actions
(
    decided_at DateTime64(3, 'UTC'),
    policy LowCardinality(String),
    target String,
    step UInt8,
    kind LowCardinality(String),
    action LowCardinality(String),
    dry_run UInt8,
    gpu_uuid String,
    node LowCardinality(String),
    job_id String,
    team LowCardinality(String),
    project LowCardinality(String),
    idle_since DateTime64(3, 'UTC'),
    usd_at_stake Float64,
    reason String,
    outcome String
)
ENGINE = MergeTree
PARTITION BY toYYYYMM(decided_at)
ORDER BY (policy, target, step, decided_at);
