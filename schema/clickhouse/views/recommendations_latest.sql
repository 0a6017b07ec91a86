-- The latest saved run's recommendations, largest saving first.
CREATE OR REPLACE VIEW gpuledger.recommendations_latest AS
SELECT
    r.generated_at AS generated_at,
    r.window_start AS window_start,
    r.window_end AS window_end,
    r.kind AS kind,
    r.subject AS subject,
    r.team AS team,
    r.project AS project,
    r.current AS current,
    r.proposed AS proposed,
    r.window_saving_usd AS window_saving_usd,
    r.monthly_saving_usd AS monthly_saving_usd,
    r.risk AS risk,
    r.detail AS detail
FROM gpuledger.recommendations AS r
WHERE r.generated_at = (SELECT max(m.generated_at) FROM gpuledger.recommendations AS m)
ORDER BY monthly_saving_usd DESC;
