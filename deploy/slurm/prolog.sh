#!/bin/sh
# gpuledger Slurm Prolog: publish that $SLURM_JOB_ID started on this node's GPUs.
#
# slurm.conf:  Prolog=/etc/slurm/prolog.d/gpuledger-prolog.sh   PrologFlags=Alloc
# Settings (GPULEDGER_BOOTSTRAP, GPULEDGER_TOPIC_PREFIX, ...) come from
# /etc/gpuledger/gpuledger.env, the file the systemd units read.
#
# A Prolog that exits non-zero drains the node and requeues the job, so this script always
# exits 0: a failure is logged (syslog tag gpuledger-slurm) and the agent still attributes
# the job's processes through their SLURM_JOB_ID.

# The shared part: next to this script in a checkout, else where deploy/README.md installs it.
for common in "${0%/*}/common.sh" /etc/slurm/gpuledger-common.sh; do
    # shellcheck disable=SC1090,SC1091  # found at run time
    [ -r "$common" ] && . "$common" && run_hook prolog
done
echo "gpuledger-slurm: prolog job ${SLURM_JOB_ID:-?}: /etc/slurm/gpuledger-common.sh is missing" >&2
exit 0
