-- Cost per environment over a window [start, end): tag_costs' environment rows.
CREATE OR REPLACE VIEW gpuledger.environment_costs AS
SELECT t.value AS environment, t.* EXCEPT (tag, value)
FROM gpuledger.tag_costs(
    start = {start:DateTime64(3, 'UTC')}, end = {end:DateTime64(3, 'UTC')}) AS t
WHERE t.tag = 'environment';
