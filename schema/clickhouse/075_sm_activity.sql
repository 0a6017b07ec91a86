-- GPM's SM activity beside NVML's busy time (docs/ARCHITECTURE.md §3): `cost_facts.sm_active`
-- is the GPU's (or MIG instance's) share of SMs busy over the sample, NULL where the GPU has
-- no GPM; the job, GPU and hour rollup sums it as it sums util_sm: `sm_gpu_seconds` (GPU
-- seconds of rows with an SM activity) and `sm_active_seconds` (Σ sm_active x those seconds),
-- so a mean is sm_active_seconds / sm_gpu_seconds, NULL where no row had one.
--
-- 077 gives the rollup's materialized view a query that fills them. Facts stored before this file
-- have no SM activity, so there is nothing to backfill. The minute and hour rollups do not
-- sum it: the views that need SM activity over a window read focus_hourly_charges.

ALTER TABLE gpuledger.cost_facts
    ADD COLUMN IF NOT EXISTS sm_active Nullable(Float32) CODEC(ZSTD(3));

ALTER TABLE gpuledger.cost_job_gpu_hour
    ADD COLUMN IF NOT EXISTS sm_gpu_seconds Float64 DEFAULT 0 AFTER util_sm_seconds,
    ADD COLUMN IF NOT EXISTS sm_active_seconds Float64 DEFAULT 0 AFTER sm_gpu_seconds;
