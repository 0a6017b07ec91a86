-- What a stream worker needs to take over after a crash, a restart or a rebalance without
-- losing or doubling a correction (schema/clickhouse/README.md, "Corrections").

-- The event time each field of a job was set at (`labels.KEY` per label), so that a worker
-- rebuilt from `jobs` merges late events exactly as the worker that lived through them.
ALTER TABLE gpuledger.jobs ADD COLUMN IF NOT EXISTS field_ts Map(String, Float64);

-- Every NodeInfo, not just the latest: each governs its node's samples from its ts to the
-- next one, and a compacted nodes topic keeps only the latest. Read with FINAL.
CREATE TABLE IF NOT EXISTS gpuledger.node_history
(
    ${node_info}
)
ENGINE = ReplacingMergeTree
ORDER BY (node, ts);

-- Which samples partition a GPU's samples arrive in: the worker that owns that partition is
-- the only one that corrects the GPU's facts. Read with FINAL.
CREATE TABLE IF NOT EXISTS gpuledger.gpu_partitions
(
    gpu_uuid String,
    samples_partition UInt32,
    seen_at DateTime64(3, 'UTC')
)
ENGINE = ReplacingMergeTree(seen_at)
ORDER BY gpu_uuid;

-- Per samples partition, the metadata offsets up to which the partition's owner has applied
-- every correction: a new owner redoes the corrections of the metadata after them. Read
-- with FINAL.
CREATE TABLE IF NOT EXISTS gpuledger.correction_progress
(
    samples_partition UInt32,
    topic String,
    partition UInt32,
    next_offset UInt64,
    updated_at DateTime64(3, 'UTC')
)
ENGINE = ReplacingMergeTree(updated_at)
ORDER BY (samples_partition, topic, partition);

-- A worker asks whether a message was already dead-lettered (a replay after a crash) by
-- its topic, partition and offset.
ALTER TABLE gpuledger.deadletters ADD INDEX IF NOT EXISTS offset_minmax offset TYPE minmax GRANULARITY 1;
