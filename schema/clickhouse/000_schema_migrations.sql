-- The migration runner's own ledger (schema/migrate.py). It runs this file first on an
-- empty server, so every statement here must stay idempotent.

CREATE DATABASE IF NOT EXISTS gpuledger;

CREATE TABLE IF NOT EXISTS gpuledger.schema_migrations
(
    version UInt32,
    name String,
    checksum String,
    applied_at DateTime64(3, 'UTC')
)
ENGINE = MergeTree
ORDER BY version;
