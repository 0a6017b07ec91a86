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

PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:${PATH:-}
export PATH
GPULEDGER=${GPULEDGER:-/opt/gpuledger/bin/gpuledger}
ENV_FILE=${GPULEDGER_ENV_FILE:-/etc/gpuledger/gpuledger.env}
TIMEOUT_S=${GPULEDGER_SLURM_TIMEOUT_S:-20}

log() {
    # syslog when there is one, and stderr (which slurmd keeps in its log at debug level).
    logger -t gpuledger-slurm -- "prolog job ${SLURM_JOB_ID:-?}: $*" 2>/dev/null || true
    echo "gpuledger-slurm: prolog job ${SLURM_JOB_ID:-?}: $*" >&2
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
    if ! args=$(timeout "$TIMEOUT_S" "$GPULEDGER" slurm start-args 2>"$errors"); then
        log "cannot describe the job: $(cat -- "$errors")"
        exit 0
    fi
    if [ -s "$errors" ]; then
        log "$(cat -- "$errors")"
    fi
elif ! args=$(timeout "$TIMEOUT_S" "$GPULEDGER" slurm start-args 2>/dev/null); then
    log "cannot describe the job (and no temporary file for the reason)"
    exit 0
fi
eval "set -- $args"
if ! out=$(timeout "$TIMEOUT_S" "$GPULEDGER" jobs start "$@" 2>&1); then
    log "gpuledger jobs start failed: $out"
fi
exit 0
