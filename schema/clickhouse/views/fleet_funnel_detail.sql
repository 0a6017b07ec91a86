-- The fleet funnel over a window [start, end) per team and GPU model, and per UTC day and
-- project too where detail = 1 (else day 1970-01-01 and project ''), in GPU-hours and dollars,
-- each stage inside the one before:
-- - total: every GPU-second the fleet paid for (unallocated time has team '' and project '');
-- - allocated: held by a job;
-- - active: allocated and busy (not idle: util_sm at or above the idle threshold, or no
--   utilization measured, as for MIG instances without GPU Performance Monitoring);
-- - effective: active time weighted by what its SMs did: GPM's SM activity where the GPU has
--   GPM, else NVML's busy time (Σ gpu_seconds x that, and Σ cost_usd x that, over active rows
--   that measured one).
-- So total >= allocated >= active >= effective, per row and summed over any rows.
CREATE OR REPLACE VIEW gpuledger.fleet_funnel_detail AS
WITH ifNull(f.sm_active, f.util_sm) AS worked  -- what the SMs did, where measured
SELECT
    if({detail:UInt8} = 1, toDate(f.ts), toDate(0)) AS day,
    f.team AS team,
    toLowCardinality(if({detail:UInt8} = 1, f.project, '')) AS project,
    f.gpu_model AS gpu_model,
    sum(toFloat64(f.duration_s) * f.share * f.sign) / 3600 AS total_gpu_hours,
    sum(f.cost_usd * f.sign) AS total_usd,
    sumIf(toFloat64(f.duration_s) * f.share * f.sign, f.allocated = 1) / 3600
        AS allocated_gpu_hours,
    sumIf(f.cost_usd * f.sign, f.allocated = 1) AS allocated_usd,
    sumIf(toFloat64(f.duration_s) * f.share * f.sign, f.allocated = 1 AND f.idle = 0) / 3600
        AS active_gpu_hours,
    sumIf(f.cost_usd * f.sign, f.allocated = 1 AND f.idle = 0) AS active_usd,
    sumIf(toFloat64(f.duration_s) * f.share * f.sign * assumeNotNull(worked),
        f.allocated = 1 AND f.idle = 0 AND worked IS NOT NULL) / 3600 AS effective_gpu_hours,
    sumIf(f.cost_usd * f.sign * assumeNotNull(worked),
        f.allocated = 1 AND f.idle = 0 AND worked IS NOT NULL) AS effective_usd
FROM gpuledger.cost_facts AS f
WHERE f.ts >= {start:DateTime64(3, 'UTC')} AND f.ts < {end:DateTime64(3, 'UTC')}
GROUP BY day, team, project, gpu_model
HAVING sum(toInt64(f.sign)) != 0;
