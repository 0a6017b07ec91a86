-- Per job: GPU time, peaks, utilization and its p95, the inputs of right-sizing: job_usage's
-- rows without the sums that job_costs adds up.
CREATE OR REPLACE VIEW gpuledger.job_resource_profile AS
SELECT u.* EXCEPT (util_gpu_seconds, util_sm_seconds, util_rows, sm_gpu_seconds,
    sm_active_seconds, gpu_set)
FROM gpuledger.job_usage(
    start = {start:DateTime64(3, 'UTC')}, end = {end:DateTime64(3, 'UTC')}) AS u;
