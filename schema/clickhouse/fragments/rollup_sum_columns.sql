-- The columns of every rollup table (cost_minute, cost_hour, cost_job_gpu_hour) that
-- rollup_sums fills, but for `rows`, which each table places itself.
gpu_seconds Float64,
cost_usd Float64,
idle_cost_usd Float64,
util_gpu_seconds Float64,
util_sm_seconds Float64,
idle_gpu_seconds Float64,
price_missing_gpu_seconds Float64,
util_rows Int64
