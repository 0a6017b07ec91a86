-- EffectiveCost per project over all time: project_effective_cost_between over every instant
-- a fact can have (the epoch to 2100).
CREATE OR REPLACE VIEW gpuledger.project_effective_cost AS
SELECT *
FROM gpuledger.project_effective_cost_between(
    start = toDateTime64(0, 3, 'UTC'), end = toDateTime64(4102444800, 3, 'UTC')
);
