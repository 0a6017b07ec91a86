-- The fleet funnel over a window [start, end) per team and GPU model, over the window's days
-- and projects (the board, the report and Grafana read it; fleet_funnel_detail says what each
-- stage is).
CREATE OR REPLACE VIEW gpuledger.fleet_funnel AS
SELECT d.* EXCEPT (day, project)
FROM gpuledger.fleet_funnel_detail(
    start = {start:DateTime64(3, 'UTC')}, end = {end:DateTime64(3, 'UTC')}, detail = 0) AS d;
