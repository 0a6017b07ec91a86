# shellcheck shell=sh
# What the gpuledger Slurm Prolog and Epilog share: their settings, their log, and publishing
# the job event that `gpuledger slurm start-args|finish-args` describes. Sourced by both,
# never run; installed as /etc/slurm/gpuledger-common.sh (deploy/README.md).
#
# A Prolog or Epilog that exits non-zero drains the node: every failure is logged (syslog tag
# gpuledger-slurm, and stderr), `publish_job` returns 0 and `run_hook` exits 0.

PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:${PATH:-}
export PATH
GPULEDGER=${GPULEDGER:-/opt/gpuledger/bin/gpuledger}
ENV_FILE=${GPULEDGER_ENV_FILE:-/etc/gpuledger/gpuledger.env}
TIMEOUT_S=${GPULEDGER_SLURM_TIMEOUT_S:-20}
hook=slurm

log() {
    # syslog when there is one, and stderr (which slurmd keeps in its log at debug level).
    logger -t gpuledger-slurm -- "$hook job ${SLURM_JOB_ID:-?}: $*" 2>/dev/null || true
    echo "gpuledger-slurm: $hook job ${SLURM_JOB_ID:-?}: $*" >&2
}

# publish_job HOOK DESCRIBE WHAT ACTION: `gpuledger slurm DESCRIBE` gives the arguments of
# `gpuledger jobs ACTION`; WHAT names the event in the log ("the job", "the job's end").
publish_job() {
    hook=$1
    describe=$2
    what=$3
    action=$4
    if [ -r "$ENV_FILE" ]; then
        set -a
        # shellcheck disable=SC1090  # the path is a setting
        . "$ENV_FILE"
        set +a
    fi
    errors=$(mktemp 2>/dev/null) || errors=""
    if [ -n "$errors" ]; then
        trap 'rm -f -- "$errors"' EXIT
        if ! args=$(timeout "$TIMEOUT_S" "$GPULEDGER" slurm "$describe" 2>"$errors"); then
            log "cannot describe $what: $(cat -- "$errors")"
            return 0
        fi
        if [ -s "$errors" ]; then
            log "$(cat -- "$errors")"
        fi
    elif ! args=$(timeout "$TIMEOUT_S" "$GPULEDGER" slurm "$describe" 2>/dev/null); then
        log "cannot describe $what (and no temporary file for the reason)"
        return 0
    fi
    eval "set -- $args"
    if ! out=$(timeout "$TIMEOUT_S" "$GPULEDGER" jobs "$action" "$@" 2>&1); then
        log "gpuledger jobs $action failed: $out"
    fi
    return 0
}

# run_hook prolog|epilog: publish the hook's job event (the job's start, or its end), exit 0.
run_hook() {
    case $1 in
        prolog) publish_job prolog start-args "the job" start ;;
        epilog) publish_job epilog finish-args "the job's end" finish ;;
    esac
    exit 0
}
