-- The fleet funnel over a window [start, end) per team and GPU model: fleet_funnel_daily
-- summed over the window's days and projects (the board, the report and Grafana read it).
CREATE OR REPLACE VIEW gpuledger.fleet_funnel AS
SELECT
    d.team AS team,
    d.gpu_model AS gpu_model,
    sum(d.total_gpu_hours) AS total_gpu_hours,
    sum(d.total_usd) AS total_usd,
    sum(d.allocated_gpu_hours) AS allocated_gpu_hours,
    sum(d.allocated_usd) AS allocated_usd,
    sum(d.active_gpu_hours) AS active_gpu_hours,
    sum(d.active_usd) AS active_usd,
    sum(d.effective_gpu_hours) AS effective_gpu_hours,
    sum(d.effective_usd) AS effective_usd
FROM gpuledger.fleet_funnel_daily(
    start = {start:DateTime64(3, 'UTC')}, end = {end:DateTime64(3, 'UTC')}) AS d
GROUP BY team, gpu_model;
