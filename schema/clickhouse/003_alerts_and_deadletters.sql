-- Alerts as the worker emitted them (every firing update and the resolution), and the
-- messages it refused.

CREATE TABLE IF NOT EXISTS gpuledger.alerts
(
    ts DateTime64(3, 'UTC'),
    kind LowCardinality(String),
    state LowCardinality(String),
    gpu_uuid String,
    node LowCardinality(String),
    job_id String,
    team LowCardinality(String),
    project LowCardinality(String),
    since DateTime64(3, 'UTC'),
    idle_seconds Float64,
    wasted_usd Float64,
    message String
)
ENGINE = MergeTree
PARTITION BY toYYYYMM(ts)
ORDER BY (kind, gpu_uuid, job_id, ts)
SETTINGS non_replicated_deduplication_window = 10000;

-- Dead letters (docs/ARCHITECTURE.md §2): the original bytes and why they were refused; idx is the
-- sample's index inside its SampleBatch, NULL for a whole message.
CREATE TABLE IF NOT EXISTS gpuledger.deadletters
(
    ts DateTime64(3, 'UTC'),
    topic LowCardinality(String),
    partition UInt32,
    offset UInt64,
    idx Nullable(UInt32),
    error String,
    value_b64 String CODEC(ZSTD(3))
)
ENGINE = MergeTree
PARTITION BY toYYYYMM(ts)
ORDER BY (topic, ts)
SETTINGS non_replicated_deduplication_window = 10000;
