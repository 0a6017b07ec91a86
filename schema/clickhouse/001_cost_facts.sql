-- Per-second cost facts (docs/ARCHITECTURE.md §3, §4): one row per GPU (or MIG instance), sample and
-- attributed job, plus the cancel (sign = -1) and restate (sign = +1) rows of late metadata.
-- Every reader sums `value * sign`.
--
-- Layout, measured on 1.15 M synthetic rows of a 256-GPU fleet (schema/clickhouse/README.md):
-- about 5.8 bytes/row on disk after merges. Plain ZSTD beats Gorilla/FPC on these floats
-- (NVML values are quantised, not smooth); Delta + ZSTD is best on ts. ORDER BY job_id
-- first makes "what did job X cost" a primary-key lookup; it compressed slightly better than
-- (node, gpu_uuid, ts) or (team, project, job_id, gpu_uuid, ts). The bloom filter on
-- gpu_uuid serves the worker's lookups by GPU and time (restatement, duplicate checks):
-- 6 of 118 granules read instead of 119 of 141, for no measurable size.
-- The dedup window makes insert_deduplication_token work on a plain MergeTree.

CREATE TABLE IF NOT EXISTS gpuledger.cost_facts
(
    ts DateTime64(3, 'UTC') CODEC(Delta, ZSTD(3)),
    sign Int8 CODEC(ZSTD(3)),
    node LowCardinality(String) CODEC(ZSTD(3)),
    gpu_uuid String CODEC(ZSTD(3)),
    gpu_model LowCardinality(String) CODEC(ZSTD(3)),
    mig_profile LowCardinality(String) CODEC(ZSTD(3)),
    job_id String CODEC(ZSTD(3)),
    team LowCardinality(String) CODEC(ZSTD(3)),
    project LowCardinality(String) CODEC(ZSTD(3)),
    job_type LowCardinality(String) CODEC(ZSTD(3)),
    experiment_id LowCardinality(String) CODEC(ZSTD(3)),
    provider LowCardinality(String) CODEC(ZSTD(3)),
    region LowCardinality(String) CODEC(ZSTD(3)),
    pricing_model LowCardinality(String) CODEC(ZSTD(3)),
    duration_s Float32 CODEC(ZSTD(3)),
    share Float32 CODEC(ZSTD(3)),
    util_sm Nullable(Float32) CODEC(ZSTD(3)),
    mem_used_bytes UInt64 CODEC(ZSTD(3)),
    power_w Float32 CODEC(ZSTD(3)),
    usd_per_gpu_hour Float64 CODEC(ZSTD(3)),
    cost_usd Float64 CODEC(ZSTD(3)),
    idle_cost_usd Float64 CODEC(ZSTD(3)),
    allocated UInt8 CODEC(ZSTD(3)),
    idle UInt8 CODEC(ZSTD(3)),
    price_missing UInt8 CODEC(ZSTD(3)),
    INDEX gpu_uuid_bloom gpu_uuid TYPE bloom_filter(0.01) GRANULARITY 1
)
ENGINE = MergeTree
PARTITION BY toDate(ts)
ORDER BY (job_id, gpu_uuid, ts)
SETTINGS non_replicated_deduplication_window = 10000;
