-- What cost_job_gpu_hour keeps beside the rollup sums, from cost_facts `f` (040 says what each
-- is for): the live rows without a price, the cancel rows, and first and last ts, peaks and
-- the p95 state over the cell's rows.
sumIf(toInt64(f.sign), f.price_missing = 1) AS price_missing_rows,
toInt64(countIf(f.sign < 0)) AS cancelled_rows,
toInt64(0) AS backfill_overlaps,
min(f.ts) AS first_ts,
max(f.ts) AS last_ts,
max(f.util_sm) AS max_util_sm,
max(f.mem_used_bytes) AS peak_mem_bytes,
quantileExactWeightedStateIf(0.95)(assumeNotNull(f.util_sm),
    toUInt64(round(toFloat64(f.duration_s) * f.share * 1000)),
    f.sign > 0 AND f.util_sm IS NOT NULL) AS util_sm_p95
