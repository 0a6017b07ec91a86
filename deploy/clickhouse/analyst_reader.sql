-- A read-only role for analysts and dashboards on a ClickHouse server (the embedded store has
-- one user, its owner). No credentials here: create_analyst_user.sh makes
-- the user from a secret. Idempotent: run it again after a gpuledger upgrade.
--
-- readonly = 2: no INSERT, ALTER, DROP, CREATE or SYSTEM; settings of a query may change
-- (clickhouse-connect and Grafana's plugin send some), but only within the bounds below.

CREATE SETTINGS PROFILE IF NOT EXISTS gpuledger_reader_profile SETTINGS
    readonly = 2,
    max_execution_time = 60 MAX 600,
    max_memory_usage = 8000000000 MAX 32000000000,
    max_rows_to_read = 10000000000 MAX 100000000000,
    max_result_rows = 1000000 MAX 100000000,
    max_concurrent_queries_for_user = 16 MAX 64;

CREATE ROLE IF NOT EXISTS gpuledger_reader SETTINGS PROFILE 'gpuledger_reader_profile';

-- Everything in the database (tables, views, rollups), and nothing else.
GRANT SELECT ON gpuledger.* TO gpuledger_reader;
