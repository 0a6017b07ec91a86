"""Slurm job events: what the Prolog and Epilog scripts (deploy/slurm/) publish.

The scripts call `gpuledger slurm start-args` / `finish-args`, which read the Slurm
environment (and `nvidia-smi`, `scontrol`), and print the arguments of `gpuledger jobs start`
/ `gpuledger jobs finish`, shell-quoted; the scripts then run those commands. The decisions
are the pure functions below, tested on recorded environments and tool output.

- job id: `SLURM_JOB_ID` (the agent labels the job's processes with the same id).
- team: `SLURM_JOB_ACCOUNT`.
- project, job type, experiment, model, environment: `key=value` words in the job's comment
  (`sbatch --comment "project=detector job_type=training experiment_id=exp-42
  model=llama-3-8b env=prod"`), else the project is `SLURM_WCKEY`, else a one-word comment.
- GPUs: `SLURM_JOB_GPUS` (else `CUDA_VISIBLE_DEVICES`, `SLURM_STEP_GPUS`): indices are mapped
  to UUIDs with `nvidia-smi --query-gpu=index,uuid --format=csv,noheader`; UUIDs (`GPU-…`,
  `MIG-…`) are kept as they are.
- final state: `scontrol show job`'s JobState when it is final (COMPLETED → succeeded,
  CANCELLED → cancelled, PREEMPTED → preempted, FAILED / TIMEOUT / NODE_FAIL /
  OUT_OF_MEMORY / BOOT_FAIL / DEADLINE → failed); else the exit code (`SLURM_JOB_EXIT_CODE2`
  `exit:signal`, `SLURM_JOB_EXIT_CODE` wait status, scontrol's `ExitCode`): a signal →
  cancelled, a non-zero exit → failed, 0:0 → succeeded; else `GPULEDGER_SLURM_UNKNOWN_STATE`
  (default failed, so that an unknown outcome never counts as a success).
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from collections.abc import Mapping, Sequence

NVIDIA_SMI_QUERY = ("--query-gpu=index,uuid", "--format=csv,noheader")
FINAL_STATES = ("succeeded", "failed", "preempted", "cancelled")
UNKNOWN_STATE_VAR = "GPULEDGER_SLURM_UNKNOWN_STATE"

_SLURM_STATES = {
    "COMPLETED": "succeeded",
    "CANCELLED": "cancelled",
    "PREEMPTED": "preempted",
    "FAILED": "failed",
    "TIMEOUT": "failed",
    "NODE_FAIL": "failed",
    "OUT_OF_MEMORY": "failed",
    "BOOT_FAIL": "failed",
    "DEADLINE": "failed",
}
_COMMENT_KEYS = {
    "project": "project",
    "job_type": "job_type",
    "type": "job_type",
    "experiment_id": "experiment_id",
    "experiment": "experiment_id",
    "model": "model",
    "environment": "environment",
    "env": "environment",
}
_JOB_TYPES = ("training", "inference", "tuning", "data_processing", "notebook", "other")


class SlurmError(ValueError):
    """Input from Slurm or nvidia-smi that cannot be used; the message says which."""


def parse_gpu_uuids(nvidia_smi_csv: str) -> dict[int, str]:
    """`index, uuid` lines (nvidia-smi's CSV without header) as {index: uuid}."""
    mapping: dict[int, str] = {}
    for number, line in enumerate(nvidia_smi_csv.splitlines(), start=1):
        if not line.strip():
            continue
        index_text, sep, uuid = (part.strip() for part in line.partition(","))
        if not sep or not index_text.isdigit() or not uuid:
            raise SlurmError(
                f"nvidia-smi line {number}: expected 'index, uuid', got {line.strip()!r}"
            )
        mapping[int(index_text)] = uuid
    return mapping


def _expand_ranges(text: str) -> list[str]:
    """`0,2-3` → ['0', '2', '3']; UUIDs pass through."""
    items: list[str] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        low, dash, high = part.partition("-")
        if dash and low.isdigit() and high.isdigit():
            items.extend(str(i) for i in range(int(low), int(high) + 1))
        else:
            items.append(part)
    return items


def allocated_gpus(env: Mapping[str, str]) -> list[str]:
    """The job's GPUs on this node as Slurm names them (indices or UUIDs)."""
    for name in ("SLURM_JOB_GPUS", "CUDA_VISIBLE_DEVICES", "SLURM_STEP_GPUS"):
        value = env.get(name, "").strip()
        if value and value.lower() not in ("nodevfiles", "none"):
            return _expand_ranges(value)
    return []


def gpu_uuids(gpus: Sequence[str], index_to_uuid: Mapping[int, str]) -> list[str]:
    """UUIDs for `gpus`; an index nvidia-smi does not list is an error naming it."""
    uuids: list[str] = []
    for gpu in gpus:
        if gpu.startswith(("GPU-", "MIG-")):
            uuids.append(gpu)
        elif gpu.isdigit():
            if int(gpu) not in index_to_uuid:
                raise SlurmError(
                    f"GPU index {gpu} is not in nvidia-smi's list "
                    f"{sorted(index_to_uuid)}; check gres.conf against the node's GPUs"
                )
            uuids.append(index_to_uuid[int(gpu)])
        else:
            raise SlurmError(f"GPU {gpu!r} is neither an index nor a GPU-/MIG- UUID")
    return uuids


def comment_fields(comment: str) -> dict[str, str]:
    """`project=x job_type=training experiment=e1` (spaces, commas or semicolons between)."""
    found: dict[str, str] = {}
    for word in re.split(r"[\s,;]+", comment.strip()):
        key, sep, value = word.partition("=")
        if sep and key.lower() in _COMMENT_KEYS and value:
            found[_COMMENT_KEYS[key.lower()]] = value
    return found


def start_args(
    env: Mapping[str, str],
    index_to_uuid: Mapping[int, str],
    gpus: Sequence[str] | None = None,
) -> list[str]:
    """Arguments of `gpuledger jobs start` for this job on this node (`gpus`: as Slurm names
    them, default `allocated_gpus(env)`)."""
    job_id = env.get("SLURM_JOB_ID", "").strip()
    if not job_id:
        raise SlurmError("SLURM_JOB_ID is not set: run this from a Slurm Prolog")
    args = [job_id]
    for uuid in gpu_uuids(allocated_gpus(env) if gpus is None else gpus, index_to_uuid):
        args += ["--gpu", uuid]
    if env.get("SLURM_JOB_ACCOUNT"):
        args += ["--team", env["SLURM_JOB_ACCOUNT"]]
    comment = env.get("SLURM_JOB_COMMENT", "")
    fields = comment_fields(comment)
    project = fields.get("project") or env.get("SLURM_WCKEY", "").strip()
    if not project and comment.strip() and not re.search(r"[\s=,;]", comment.strip()):
        project = comment.strip()
    if project:
        args += ["--project", project]
    job_type = fields.get("job_type", "").lower()
    if job_type:
        args += ["--job-type", job_type if job_type in _JOB_TYPES else "other"]
    for name, option in (
        ("experiment_id", "--experiment-id"),
        ("model", "--model"),
        ("environment", "--environment"),
    ):
        if fields.get(name):
            args += [option, fields[name]]
    for label, var in (
        ("slurm_partition", "SLURM_JOB_PARTITION"),
        ("slurm_user", "SLURM_JOB_USER"),
        ("slurm_job_name", "SLURM_JOB_NAME"),
        ("slurm_node", "SLURMD_NODENAME"),
    ):
        if env.get(var):
            args += ["--label", f"{label}={env[var]}"]
    if env.get("SLURM_JOB_START_TIME", "").isdigit():
        args += ["--at", env["SLURM_JOB_START_TIME"]]
    return args


def _from_exit(exit_code: int, signal: int) -> str:
    if signal:
        return "cancelled"
    return "failed" if exit_code else "succeeded"


def _parse_pair(text: str) -> tuple[int, int] | None:
    match = re.fullmatch(r"\s*(\d+):(\d+)\s*", text)
    return (int(match.group(1)), int(match.group(2))) if match else None


def scontrol_fields(text: str) -> dict[str, str]:
    """`Key=Value` pairs of `scontrol show job -o` output."""
    return dict(re.findall(r"(\w+)=(\S*)", text))


def final_state(env: Mapping[str, str], scontrol: Mapping[str, str] | None = None) -> str:
    """succeeded | failed | preempted | cancelled, by the rules in this module's docstring."""
    scontrol = scontrol or {}
    state = scontrol.get("JobState", "").upper()
    if state in _SLURM_STATES:
        return _SLURM_STATES[state]
    pair = _parse_pair(env.get("SLURM_JOB_EXIT_CODE2", ""))
    if pair:
        return _from_exit(*pair)
    status = env.get("SLURM_JOB_EXIT_CODE", "").strip()
    if status.isdigit():
        return _from_exit((int(status) >> 8) & 0xFF, int(status) & 0x7F)
    pair = _parse_pair(scontrol.get("ExitCode", ""))
    if pair:
        return _from_exit(*pair)
    fallback = env.get(UNKNOWN_STATE_VAR, "failed").strip().lower()
    if fallback not in FINAL_STATES:
        raise SlurmError(
            f"{UNKNOWN_STATE_VAR}={fallback!r}: must be one of {', '.join(FINAL_STATES)}"
        )
    return fallback


def finish_args(env: Mapping[str, str], scontrol: Mapping[str, str] | None = None) -> list[str]:
    """Arguments of `gpuledger jobs finish` for this job."""
    job_id = env.get("SLURM_JOB_ID", "").strip()
    if not job_id:
        raise SlurmError("SLURM_JOB_ID is not set: run this from a Slurm Epilog")
    args = [job_id, "--state", final_state(env, scontrol)]
    if env.get("SLURM_JOB_END_TIME", "").isdigit() and env["SLURM_JOB_END_TIME"] != "0":
        args += ["--at", env["SLURM_JOB_END_TIME"]]
    return args


# -- the edges: tools on the node ------------------------------------------------------
def read_gpu_uuids(nvidia_smi: str = "nvidia-smi", timeout_s: float = 10.0) -> dict[int, str]:
    try:
        done = subprocess.run(
            [nvidia_smi, *NVIDIA_SMI_QUERY],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SlurmError(f"cannot run {nvidia_smi}: {exc}") from exc
    if done.returncode != 0:
        raise SlurmError(f"{nvidia_smi} exited {done.returncode}: {done.stderr.strip()[:300]}")
    return parse_gpu_uuids(done.stdout)


def read_scontrol(
    job_id: str, scontrol: str = "scontrol", timeout_s: float = 10.0
) -> dict[str, str]:
    """scontrol's view of the job, or {} when scontrol is missing or fails."""
    try:
        done = subprocess.run(
            [scontrol, "show", "job", "-o", job_id],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return {}
    return scontrol_fields(done.stdout) if done.returncode == 0 else {}


def start_args_from_node(env: Mapping[str, str]) -> tuple[list[str], list[str]]:
    """start_args with nvidia-smi's mapping; without nvidia-smi the event goes out without
    GPUs (the agent still finds the job through its processes' SLURM_JOB_ID)."""
    warnings: list[str] = []
    gpus = allocated_gpus(env)
    mapping: dict[int, str] = {}
    if any(g.isdigit() for g in gpus):
        try:
            mapping = read_gpu_uuids(env.get("GPULEDGER_NVIDIA_SMI", "nvidia-smi"))
        except SlurmError as exc:
            warnings.append(f"{exc}; publishing the job without its GPUs")
            return start_args(env, {}, [g for g in gpus if not g.isdigit()]), warnings
    return start_args(env, mapping, gpus), warnings


def quoted(args: Sequence[str]) -> str:
    return shlex.join(args)


def main(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    """`python -m gpuledger.schedulers.slurm start-args|finish-args` (what the CLI runs)."""
    import os

    argv = list(sys.argv[1:] if argv is None else argv)
    env = dict(os.environ if env is None else env)
    if argv not in (["start-args"], ["finish-args"]):
        print("usage: python -m gpuledger.schedulers.slurm start-args|finish-args", file=sys.stderr)
        return 2
    try:
        if argv == ["start-args"]:
            args, warnings = start_args_from_node(env)
        else:
            scontrol = read_scontrol(
                env.get("SLURM_JOB_ID", ""), env.get("GPULEDGER_SCONTROL", "scontrol")
            )
            args, warnings = finish_args(env, scontrol), []
    except SlurmError as exc:
        print(f"gpuledger slurm: {exc}", file=sys.stderr)
        return 1
    for warning in warnings:
        print(f"gpuledger slurm: {warning}", file=sys.stderr)
    print(quoted(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
