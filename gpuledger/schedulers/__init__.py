"""Job events from schedulers: Slurm (Prolog/Epilog helpers) and Kubernetes (pod watcher)."""
