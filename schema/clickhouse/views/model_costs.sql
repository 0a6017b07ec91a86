-- Cost per model over a window [start, end): tag_costs' model rows.
CREATE OR REPLACE VIEW gpuledger.model_costs AS
SELECT t.value AS model, t.* EXCEPT (tag, value)
FROM gpuledger.tag_costs(
    start = {start:DateTime64(3, 'UTC')}, end = {end:DateTime64(3, 'UTC')}) AS t
WHERE t.tag = 'model';
