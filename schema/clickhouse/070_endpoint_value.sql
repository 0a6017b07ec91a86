-- What 1,000 requests to an inference endpoint are worth (revenue, or a value the owner
-- sets), effective-dated: `gpuledger value load FILE`. The endpoint is the inference job's
-- id, as in endpoint_hourly. Loading a file again replaces its rows (the newest load wins).
CREATE TABLE IF NOT EXISTS gpuledger.endpoint_value
(
    endpoint String,
    effective_from DateTime64(3, 'UTC'),
    usd_per_1k_requests Float64,
    note String,
    source String,
    loaded_at DateTime64(3, 'UTC')
)
ENGINE = ReplacingMergeTree(loaded_at)
ORDER BY (endpoint, effective_from);
