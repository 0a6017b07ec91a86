-- The identity of a usage report (UsageEvent): (job_id, source, ts to the millisecond).
-- `source` names the reporter (a replica, pod or host of an inference endpoint), so that two
-- replicas reporting the same second are two rows. Rows stored before this file keep
-- source = '' and their values: the figures of the past do not move.
--
-- The worker stores each identity once: before it inserts usage rows it drops those whose
-- identity is already stored (a re-sent event, a replay after a restart, the same events
-- consumed in other batches), and a retried insert carries the same deduplication token.
-- So `usage` holds one row per identity and every reader sums it as before: `sum()`.
ALTER TABLE gpuledger.usage ADD COLUMN IF NOT EXISTS source String DEFAULT '' AFTER job_id;
