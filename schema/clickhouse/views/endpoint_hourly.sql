-- Inference endpoints (long-running inference jobs) per hour with cost: what the GPUs cost and
-- how many requests came in (inference_cost). An hour with cost and no usage row has
-- requests = 0: that is what an idle endpoint looks like.
CREATE OR REPLACE VIEW gpuledger.endpoint_hourly AS
SELECT
    c.job_id AS job_id,
    c.period AS hour,
    c.* EXCEPT (job_id, period, costed)
FROM gpuledger.inference_cost(
    start = {start:DateTime64(3, 'UTC')}, end = {end:DateTime64(3, 'UTC')}, daily = 0) AS c
WHERE c.costed = 1;
