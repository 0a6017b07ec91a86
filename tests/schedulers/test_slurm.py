"""Slurm Prolog/Epilog: the environment slurmd gives the scripts becomes `gpuledger jobs
start|finish`, with GPU indices mapped to UUIDs through nvidia-smi; the scripts themselves
run with a fake nvidia-smi (and scontrol) on PATH and publish to the real broker."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from gpuledger.broker import EmbeddedBroker
from gpuledger.schedulers.slurm import (
    NVIDIA_SMI_QUERY,
    SlurmError,
    final_state,
    finish_args,
    parse_gpu_uuids,
    scontrol_fields,
    start_args,
)
from gpuledger.schema.messages import JobEvent
from gpuledger.schema.topics import Topics
from tests.support import read_topic

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = Path(__file__).parent / "fixtures"
GPULEDGER = str(Path(sys.executable).parent / "gpuledger")
NVIDIA_SMI = (FIXTURES / "nvidia-smi-8gpu.csv").read_text()
UUIDS = parse_gpu_uuids(NVIDIA_SMI)


def env_file(name: str) -> dict[str, str]:
    pairs = (line.split("=", 1) for line in (FIXTURES / name).read_text().splitlines() if line)
    return dict(pairs)


def test_nvidia_smi_output_maps_every_index_to_its_uuid() -> None:
    assert len(UUIDS) == 8
    assert UUIDS[0] == "GPU-3b2d7c1e-5a1f-4c0e-9d42-0c1f2a7e8b01"
    assert UUIDS[7] == "GPU-e91b5c62-4a7d-4f3e-8b09-6c2a1f0d7e08"


def test_a_garbled_nvidia_smi_line_is_named() -> None:
    with pytest.raises(SlurmError, match=r"line 2: expected 'index, uuid'"):
        parse_gpu_uuids("0, GPU-a\nNo devices were found\n")


def test_prolog_environment_becomes_the_jobs_start_arguments() -> None:
    args = start_args(env_file("slurm-prolog.env"), UUIDS)
    assert args == [
        "4242",
        "--gpu", UUIDS[0],
        "--gpu", UUIDS[2],
        "--team", "vision",
        "--project", "detector",
        "--job-type", "training",
        "--experiment-id", "exp-42",
        "--model", "yolo-v9",
        "--environment", "prod",
        "--label", "slurm_partition=gpu",
        "--label", "slurm_user=ada",
        "--label", "slurm_job_name=train-detector",
        "--label", "slurm_node=gpu-node-07",
        "--at", "1795600800",
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("extra", "gpus", "project"),
    [
        ({"SLURM_JOB_GPUS": "1-3"}, [1, 2, 3], "detector"),
        ({"SLURM_JOB_GPUS": "", "CUDA_VISIBLE_DEVICES": "GPU-x,MIG-y"}, ["GPU-x", "MIG-y"], None),
        ({"SLURM_JOB_COMMENT": "", "SLURM_WCKEY": "ranker"}, [0, 2], "ranker"),
        ({"SLURM_JOB_COMMENT": "ranker"}, [0, 2], "ranker"),
        ({"SLURM_JOB_COMMENT": "nightly run of the ranker"}, [0, 2], None),
    ],
)
def test_gpus_and_project_from_other_slurm_setups(
    extra: dict[str, str], gpus: list[int | str], project: str | None
) -> None:
    env = {**env_file("slurm-prolog.env"), **extra}
    if "SLURM_JOB_COMMENT" not in extra and extra.get("CUDA_VISIBLE_DEVICES"):
        env["SLURM_JOB_COMMENT"] = ""
    args = start_args(env, UUIDS)
    got = [args[i + 1] for i, a in enumerate(args) if a == "--gpu"]
    assert got == [UUIDS[g] if isinstance(g, int) else g for g in gpus]
    assert (args[args.index("--project") + 1] if "--project" in args else None) == project


def test_a_gpu_index_the_node_does_not_have_is_an_error() -> None:
    with pytest.raises(SlurmError, match="GPU index 9 is not in nvidia-smi's list"):
        start_args({**env_file("slurm-prolog.env"), "SLURM_JOB_GPUS": "9"}, UUIDS)


@pytest.mark.parametrize(
    ("env", "scontrol", "state"),
    [
        ({}, "JobState=COMPLETED ExitCode=0:0", "succeeded"),
        ({}, "JobState=CANCELLED ExitCode=0:15", "cancelled"),
        ({}, (FIXTURES / "scontrol-preempted.txt").read_text(), "preempted"),
        ({}, "JobState=TIMEOUT ExitCode=0:1", "failed"),
        ({}, "JobState=OUT_OF_MEMORY ExitCode=0:125", "failed"),
        ({}, (FIXTURES / "scontrol-completing-exit1.txt").read_text(), "failed"),
        ({"SLURM_JOB_EXIT_CODE2": "0:0"}, "JobState=COMPLETING", "succeeded"),
        ({"SLURM_JOB_EXIT_CODE2": "0:9"}, "", "cancelled"),
        ({"SLURM_JOB_EXIT_CODE2": "3:0"}, "", "failed"),
        ({"SLURM_JOB_EXIT_CODE": str(2 << 8)}, "", "failed"),
        ({"SLURM_JOB_EXIT_CODE": "0"}, "", "succeeded"),
        ({}, "", "failed"),
        ({"GPULEDGER_SLURM_UNKNOWN_STATE": "succeeded"}, "", "succeeded"),
    ],
)
def test_exit_state_maps_to_the_job_outcome(env: dict[str, str], scontrol: str, state: str) -> None:
    assert final_state({"SLURM_JOB_ID": "4242", **env}, scontrol_fields(scontrol)) == state


def test_epilog_on_the_controller_uses_exit_code_and_end_time() -> None:
    args = finish_args(env_file("slurm-epilog-ctld-cancelled.env"), {})
    assert args == ["4242", "--state", "cancelled", "--at", "1795604400"]


def test_a_bad_unknown_state_setting_says_what_is_allowed() -> None:
    with pytest.raises(SlurmError, match="must be one of succeeded, failed"):
        final_state({"GPULEDGER_SLURM_UNKNOWN_STATE": "done"}, {})


# -- the scripts, as slurmd runs them -----------------------------------------------------
def fake_tools(folder: Path, scontrol: str | None = None) -> Path:
    """nvidia-smi (and scontrol) that print the fixtures, first on PATH."""
    folder.mkdir(parents=True, exist_ok=True)
    query = " ".join(NVIDIA_SMI_QUERY)
    (folder / "nvidia-smi").write_text(
        f'#!/bin/sh\n[ "$1 $2" = "{query}" ] || exit 6\ncat {FIXTURES / "nvidia-smi-8gpu.csv"}\n'
    )
    if scontrol is not None:
        (folder / "scontrol").write_text(f"#!/bin/sh\ncat {scontrol}\n")
    for tool in folder.iterdir():
        tool.chmod(0o755)
    return folder


def run_script(
    name: str, env: dict[str, str], tools: Path, bootstrap: str, tmp_path: Path
) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM", "GPULEDGER"))}
    clean.update(
        PATH=f"{tools}:{clean.get('PATH', '')}",
        GPULEDGER=GPULEDGER,
        GPULEDGER_BOOTSTRAP=bootstrap,
        GPULEDGER_DATA_DIR=str(tmp_path / "data"),
        GPULEDGER_ENV_FILE=str(tmp_path / "absent.env"),
        GPULEDGER_SLURM_TIMEOUT_S="30",
    )
    clean.update(env)
    return subprocess.run(
        ["sh", str(ROOT / "deploy" / "slurm" / name)],
        env=clean,
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )


def job_events(bootstrap: str, job_id: str) -> list[JobEvent]:
    records = read_topic(bootstrap, Topics().jobs, timeout_s=1.5)
    return [JobEvent.model_validate_json(r.value) for r in records if r.key == job_id.encode()]


def test_prolog_script_publishes_the_start_on_the_nodes_gpu_uuids(
    broker: EmbeddedBroker, tmp_path: Path
) -> None:
    env = {**env_file("slurm-prolog.env"), "SLURM_JOB_ID": "5001"}
    done = run_script("prolog.sh", env, fake_tools(tmp_path / "bin"), broker.bootstrap, tmp_path)
    assert done.returncode == 0, done.stderr
    assert "failed" not in done.stderr, done.stderr
    (event,) = job_events(broker.bootstrap, "5001")
    assert event.state == "running"
    assert event.gpu_uuids == [UUIDS[0], UUIDS[2]]
    assert (event.team, event.project, event.job_type) == ("vision", "detector", "training")
    assert event.experiment_id == "exp-42"
    assert (event.model, event.environment) == ("yolo-v9", "prod")
    assert event.started_at == 1795600800
    assert event.labels == {
        "slurm_partition": "gpu",
        "slurm_user": "ada",
        "slurm_job_name": "train-detector",
        "slurm_node": "gpu-node-07",
    }


def test_epilog_script_on_a_node_reads_scontrol_for_the_outcome(
    broker: EmbeddedBroker, tmp_path: Path
) -> None:
    tools = fake_tools(tmp_path / "bin", scontrol=str(FIXTURES / "scontrol-completing-exit1.txt"))
    env = {**env_file("slurm-epilog-node.env"), "SLURM_JOB_ID": "5002"}
    done = run_script("epilog.sh", env, tools, broker.bootstrap, tmp_path)
    assert done.returncode == 0, done.stderr
    (event,) = job_events(broker.bootstrap, "5002")
    assert event.state == "failed"  # COMPLETING with ExitCode=1:0
    assert event.ended_at is not None


def test_prolog_without_nvidia_smi_still_publishes_the_job(
    broker: EmbeddedBroker, tmp_path: Path
) -> None:
    empty = tmp_path / "no-tools"
    empty.mkdir()
    env = {
        **env_file("slurm-prolog.env"),
        "SLURM_JOB_ID": "5003",
        "GPULEDGER_NVIDIA_SMI": "/nonexistent/nvidia-smi",
    }
    done = run_script("prolog.sh", env, empty, broker.bootstrap, tmp_path)
    assert done.returncode == 0
    assert "publishing the job without its GPUs" in done.stderr
    (event,) = job_events(broker.bootstrap, "5003")
    assert event.gpu_uuids is None and event.team == "vision"


def test_scripts_never_fail_the_job_when_kafka_is_unreachable(tmp_path: Path) -> None:
    env = {**env_file("slurm-prolog.env"), "GPULEDGER_SLURM_TIMEOUT_S": "4"}
    done = run_script("prolog.sh", env, fake_tools(tmp_path / "bin"), "127.0.0.1:9", tmp_path)
    assert done.returncode == 0  # a failing Prolog would drain the node
    assert "gpuledger jobs start failed" in done.stderr
