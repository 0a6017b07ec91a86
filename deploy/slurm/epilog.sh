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

PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:${PATH:-}
export PATH
GPULEDGER=${GPULEDGER:-/opt/gpuledger/bin/gpuledger}
ENV_FILE=${GPULEDGER_ENV_FILE:-/etc/gpuledger/gpuledger.env}
TIMEOUT_S=${GPULEDGER_SLURM_TIMEOUT_S:-20}

log() {
    # syslog when there is one, and stderr (which slurmd keeps in its log at debug level).
    logger -t gpuledger-slurm -- "epilog job ${SLURM_JOB_ID:-?}: $*" 2>/dev/null || true
    echo "gpuledger-slurm: epilog job ${SLURM_JOB_ID:-?}: $*" >&2
}

if [ -r "$ENV_FILE" ]; then
    set -a
    # shellcheck disable=SC1090  # the path is a setting
    . "$ENV_FILE"
    set +a
fi

errors=$(mktemp 2>/dev/null) || errors=""
if [ -n "$errors" ]; then
    trap 'rm -f -- "$errors"' EXIT
    if ! args=$(timeout "$TIMEOUT_S" "$GPULEDGER" slurm finish-args 2>"$errors"); then
        log "cannot describe the job's end: $(cat -- "$errors")"
        exit 0
    fi
    if [ -s "$errors" ]; then
        log "$(cat -- "$errors")"
    fi
elif ! args=$(timeout "$TIMEOUT_S" "$GPULEDGER" slurm finish-args 2>/dev/null); then
    log "cannot describe the job's end (and no temporary file for the reason)"
    exit 0
fi
eval "set -- $args"
if ! out=$(timeout "$TIMEOUT_S" "$GPULEDGER" jobs finish "$@" 2>&1); then
    log "gpuledger jobs finish failed: $out"
fi
exit 0
