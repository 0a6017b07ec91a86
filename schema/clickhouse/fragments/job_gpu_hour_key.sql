-- The key of cost_job_gpu_hour as 040 creates it: the table's ORDER BY and the GROUP BY of
-- what feeds it (077 appends model and environment).
hour, job_id, gpu_uuid, node, gpu_model, mig_profile, team, project, job_type,
    experiment_id, provider, region, pricing_model, allocated
