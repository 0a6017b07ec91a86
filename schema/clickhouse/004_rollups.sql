-- Minute and hour rollups of cost_facts, fed by materialized views.
--
-- Every measure is Σ value * sign, so cancel and restate rows net out here too; `rows` is
-- Σ sign, the number of live fact rows (exact, unlike float sums: readers use
-- `sum(rows) != 0` to drop groups whose facts were all cancelled). `util_rows` counts the
-- live rows with a util_sm, so means are NULL, not NaN, where NVML gave none.
-- SummingMergeTree merges are late and partial: readers always aggregate with sum() and
-- GROUP BY, never trust one stored row per key.
-- The dedup window on each target is what lets an insert's deduplication token reach the
-- rollups (deduplicate_blocks_in_dependent_materialized_views = 1): without it a re-sent
-- block is dropped from cost_facts but counted again here.

-- The statements below are a template the runner renders once per rollup (RENDERINGS in
-- schema/migrate.py): cost_minute per minute in day partitions, cost_hour per hour in month
-- partitions. One row per bucket and attribution.
CREATE TABLE IF NOT EXISTS gpuledger.${rollup}
(
    ts DateTime('UTC'),
    node LowCardinality(String),
    gpu_model LowCardinality(String),
    job_id String,
    team LowCardinality(String),
    project LowCardinality(String),
    job_type LowCardinality(String),
    experiment_id LowCardinality(String),
    pricing_model LowCardinality(String),
    allocated UInt8,
    ${rollup_sum_columns},
    rows Int64
)
ENGINE = SummingMergeTree
PARTITION BY ${partition}(ts)
ORDER BY (ts, team, project, job_id, node, gpu_model, job_type, experiment_id, pricing_model,
    allocated)
SETTINGS non_replicated_deduplication_window = 10000;

CREATE MATERIALIZED VIEW IF NOT EXISTS gpuledger.${rollup}_mv TO gpuledger.${rollup} AS
SELECT
    ${bucket}(f.ts) AS ts,
    f.node AS node,
    f.gpu_model AS gpu_model,
    f.job_id AS job_id,
    f.team AS team,
    f.project AS project,
    f.job_type AS job_type,
    f.experiment_id AS experiment_id,
    f.pricing_model AS pricing_model,
    f.allocated AS allocated,
    ${rollup_sums}
FROM gpuledger.cost_facts AS f
GROUP BY ts, node, gpu_model, job_id, team, project, job_type, experiment_id, pricing_model, allocated;
