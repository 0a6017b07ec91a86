-- What the worker joins samples with, kept so that a restarted worker rebuilds its state
-- from here (Kafka changelog recovery is not reliable, docs/ARCHITECTURE.md §5) and so that late
-- metadata can re-cost samples already written (cancel and restate).

-- The raw samples the worker costed (payload = the GpuSample JSON). Replacing on
-- (gpu_uuid, ts): a sample is identified by its GPU and time, a re-sent one collapses.
-- They expire 14 days after they were stored, not after their event time: a replayed
-- month of history must still be correctable.
CREATE TABLE IF NOT EXISTS gpuledger.samples_raw
(
    ts DateTime64(3, 'UTC') CODEC(Delta, ZSTD(3)),
    node LowCardinality(String),
    gpu_uuid String,
    payload String CODEC(ZSTD(3)),
    stored_at DateTime('UTC') DEFAULT now() CODEC(Delta, ZSTD(3))
)
ENGINE = ReplacingMergeTree
PARTITION BY toDate(ts)
ORDER BY (gpu_uuid, ts)
TTL stored_at + INTERVAL 14 DAY
SETTINGS non_replicated_deduplication_window = 10000, ttl_only_drop_parts = 1;

-- The latest merged state per job. Read with FINAL: the newest updated_at wins.
CREATE TABLE IF NOT EXISTS gpuledger.jobs
(
    job_id String,
    state LowCardinality(String),
    team LowCardinality(String),
    project LowCardinality(String),
    job_type LowCardinality(String),
    experiment_id LowCardinality(String),
    gpu_uuids Array(String),
    started_at Nullable(DateTime64(3, 'UTC')),
    ended_at Nullable(DateTime64(3, 'UTC')),
    labels Map(String, String),
    updated_at DateTime64(3, 'UTC')
)
ENGINE = ReplacingMergeTree(updated_at)
ORDER BY job_id;

-- The price book as the prices topic delivered it. Read with FINAL: the newest loaded_at
-- wins for one (provider, region, gpu_model, pricing_model, effective_from).
CREATE TABLE IF NOT EXISTS gpuledger.prices
(
    provider LowCardinality(String),
    region LowCardinality(String),
    gpu_model LowCardinality(String),
    pricing_model LowCardinality(String),
    usd_per_gpu_hour Float64,
    effective_from DateTime64(3, 'UTC'),
    source String,
    loaded_at DateTime64(3, 'UTC')
)
ENGINE = ReplacingMergeTree(loaded_at)
ORDER BY (provider, region, gpu_model, pricing_model, effective_from);

-- The latest NodeInfo per node. Read with FINAL.
CREATE TABLE IF NOT EXISTS gpuledger.nodes
(
    ${node_info}
)
ENGINE = ReplacingMergeTree(ts)
ORDER BY node;

-- Inference volume per job (UsageEvent): requests and tokens since the previous event.
CREATE TABLE IF NOT EXISTS gpuledger.usage
(
    ts DateTime64(3, 'UTC') CODEC(Delta, ZSTD(3)),
    job_id String,
    requests UInt64,
    tokens UInt64
)
ENGINE = MergeTree
PARTITION BY toYYYYMM(ts)
ORDER BY (job_id, ts)
SETTINGS non_replicated_deduplication_window = 10000;
