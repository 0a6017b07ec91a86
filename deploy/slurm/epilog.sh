#!/bin/sh
# gpuledger Slurm Epilog: publish that $SLURM_JOB_ID ended, and how.
#
# slurm.conf, either on the controller (best: the exit code and the final state are known
# there)   EpilogSlurmctld=/etc/slurm/gpuledger-epilog.sh
# or on each compute node                     Epilog=/etc/slurm/epilog.d/gpuledger-epilog.sh
# The state is scontrol's final JobState, else the job's exit code, else
# $GPULEDGER_SLURM_UNKNOWN_STATE (default failed): see gpuledger/schedulers/slurm.py.
#
# An Epilog that exits non-zero drains the node, so this script always exits 0.

# The shared part: next to this script in a checkout, else where deploy/README.md installs it.
for common in "${0%/*}/common.sh" /etc/slurm/gpuledger-common.sh; do
    # shellcheck disable=SC1090,SC1091  # found at run time
    [ -r "$common" ] && . "$common" && run_hook epilog
done
echo "gpuledger-slurm: epilog job ${SLURM_JOB_ID:-?}: /etc/slurm/gpuledger-common.sh is missing" >&2
exit 0
