-- The key columns of cost_job_gpu_hour after `hour` (job_gpu_hour_key), from cost_facts `f`.
f.job_id AS job_id,
f.gpu_uuid AS gpu_uuid,
f.node AS node,
f.gpu_model AS gpu_model,
f.mig_profile AS mig_profile,
f.team AS team,
f.project AS project,
f.job_type AS job_type,
f.experiment_id AS experiment_id,
f.provider AS provider,
f.region AS region,
f.pricing_model AS pricing_model,
f.allocated AS allocated
