"""The guard: a service apart from the worker that reads the idle alerts the worker stores,
decides with the guardrail policies (`gpuledger.ledger.guard`), carries out the steps a policy
enforces through the scheduler that runs the job, and records every decision in the
`guard_actions` table (its audit trail, read back on start). It holds the cluster credentials;
the worker never does.

`store` reads the open episodes and the audit trail and writes decisions; `actuators` carries
out act steps (Slurm, Kubernetes, a webhook); `service` is the loop.
"""
