-- The signed sums of every rollup of cost_facts `f` (cost_minute, cost_hour, cost_job_gpu_hour):
-- Σ value * sign, so cancel and restate rows net out; `rows` is Σ sign, `util_rows` the live
-- rows with a util_sm.
sum(toFloat64(f.duration_s) * f.share * f.sign) AS gpu_seconds,
sum(f.cost_usd * f.sign) AS cost_usd,
sum(f.idle_cost_usd * f.sign) AS idle_cost_usd,
sumIf(toFloat64(f.duration_s) * f.share * f.sign, f.util_sm IS NOT NULL) AS util_gpu_seconds,
sumIf(toFloat64(assumeNotNull(f.util_sm)) * f.duration_s * f.share * f.sign,
    f.util_sm IS NOT NULL) AS util_sm_seconds,
sum(toFloat64(f.duration_s) * f.share * f.idle * f.sign) AS idle_gpu_seconds,
sum(toFloat64(f.duration_s) * f.share * f.price_missing * f.sign) AS price_missing_gpu_seconds,
sumIf(toInt64(f.sign), f.util_sm IS NOT NULL) AS util_rows,
sum(toInt64(f.sign)) AS rows
