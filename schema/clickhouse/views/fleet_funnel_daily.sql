-- The fleet funnel per UTC day, team, project and GPU model over a window [start, end)
-- (fleet_funnel_detail says what each stage is).
CREATE OR REPLACE VIEW gpuledger.fleet_funnel_daily AS
SELECT *
FROM gpuledger.fleet_funnel_detail(
    start = {start:DateTime64(3, 'UTC')}, end = {end:DateTime64(3, 'UTC')}, detail = 1);
