-- Dollars saved by the guard per team and month, over every decision: guard_savings_between
-- over every instant a decision can have (the epoch to 2100).
CREATE OR REPLACE VIEW gpuledger.guard_savings AS
SELECT *
FROM gpuledger.guard_savings_between(
    start = toDateTime64(0, 3, 'UTC'), end = toDateTime64(4102444800, 3, 'UTC')
);
