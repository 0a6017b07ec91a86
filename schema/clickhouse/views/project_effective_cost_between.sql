-- EffectiveCost per project over a window [start, end) (docs/ARCHITECTURE.md §3): spend in the
-- window, jobs that ended in it; project_effective_cost_periods over the window as a whole.
CREATE OR REPLACE VIEW gpuledger.project_effective_cost_between AS
SELECT p.* EXCEPT (week)
FROM gpuledger.project_effective_cost_periods(
    start = {start:DateTime64(3, 'UTC')}, end = {end:DateTime64(3, 'UTC')}, weekly = 0) AS p;
