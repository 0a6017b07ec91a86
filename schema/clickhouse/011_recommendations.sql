-- Recommendations with dollars, as `gpuledger recommend --save` computed them:
-- right-sizing, spot, reserved baseline, idle inference endpoints. The decisions are
-- made in Python (gpuledger/analysts/recommend.py) with the price book; this table keeps
-- each run's answer so that SQL and dashboards can read it.
-- kind: rightsize | spot | reserved | scale_to_zero. subject: the job id, or
-- provider/region/gpu_model for a reserved baseline. monthly_saving_usd is the window's
-- saving scaled to 30 days. Savings of different kinds on the same subject overlap: do not
-- add them up.

CREATE TABLE IF NOT EXISTS gpuledger.recommendations
(
    generated_at DateTime64(3, 'UTC'),
    window_start DateTime64(3, 'UTC'),
    window_end DateTime64(3, 'UTC'),
    kind LowCardinality(String),
    subject String,
    team LowCardinality(String),
    project LowCardinality(String),
    current String,
    proposed String,
    window_saving_usd Float64,
    monthly_saving_usd Float64,
    risk String,
    detail String
)
ENGINE = MergeTree
PARTITION BY toYYYYMM(generated_at)
ORDER BY (generated_at, kind, subject);
