-- The columns of a NodeInfo, as `nodes` (the latest per node) and `node_history` (every one)
-- store it.
node String,
provider LowCardinality(String),
region LowCardinality(String),
instance_type LowCardinality(String),
pricing_model LowCardinality(String),
usd_per_gpu_hour Nullable(Float64),
ts DateTime64(3, 'UTC')
