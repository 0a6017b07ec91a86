-- The hours of a window [start, end) that the job, GPU and hour rollup serves exactly:
-- [rollup_from, rollup_to) holds the window's whole hours, and its first and last hour too
-- when all their facts lie inside it (as for a window from the first fact to just after the
-- last). The views that take a window read the rest, inside its first and last hour, from
-- cost_facts.
CREATE OR REPLACE VIEW gpuledger.rollup_span AS
SELECT
    if((SELECT min(b.first_ts) FROM gpuledger.cost_job_gpu_hour AS b
            WHERE b.hour = toStartOfHour({start:DateTime64(3, 'UTC')}))
            >= {start:DateTime64(3, 'UTC')},
        toStartOfHour({start:DateTime64(3, 'UTC')}),
        toStartOfHour({start:DateTime64(3, 'UTC')}) + toIntervalHour(1)) AS rollup_from,
    if((SELECT max(b.last_ts) FROM gpuledger.cost_job_gpu_hour AS b
            WHERE b.hour = toStartOfHour({end:DateTime64(3, 'UTC')}))
            < {end:DateTime64(3, 'UTC')},
        toStartOfHour({end:DateTime64(3, 'UTC')}) + toIntervalHour(1),
        toStartOfHour({end:DateTime64(3, 'UTC')})) AS rollup_to;
