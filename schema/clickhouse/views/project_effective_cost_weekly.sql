-- The same per ISO week (Monday, UTC): project_effective_cost_periods per week over every
-- instant a fact can have (the epoch to 2100).
CREATE OR REPLACE VIEW gpuledger.project_effective_cost_weekly AS
SELECT *
FROM gpuledger.project_effective_cost_periods(
    start = toDateTime64(0, 3, 'UTC'), end = toDateTime64(4102444800, 3, 'UTC'), weekly = 1);
