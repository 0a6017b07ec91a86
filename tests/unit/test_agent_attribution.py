"""Process → job: environment labels and container/pod from /proc, on fixtures and for real."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gpuledger.agents.attribution import (
    ProcAttributor,
    attribute,
    labels_from_environ,
    parse_cgroup,
    parse_environ,
)
from gpuledger.schema.messages import JobType

PROC = Path(__file__).parents[1] / "fixtures" / "proc"
CID = "4f2a9c1be0d3785a6c9e21f0b7d4a8c35e6f1b2d9a0c7e4f3b8d1a6c5e2f9b07"
CID2 = "a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f90"
POD = "8d1e4c2a-5b7f-4e3d-9a6c-1f2b3c4d5e6f"


def test_docker_container_on_cgroup_v2_with_gpuledger_labels() -> None:
    found = attribute(1001, PROC)
    assert found.name == "python3"
    assert (found.container_id, found.pod_uid) == (CID, None)
    labels = found.labels
    assert (labels.job_id, labels.team, labels.project) == ("train-42", "research", "llm")
    assert (labels.job_type, labels.experiment_id) == (JobType.training, "exp-7")
    assert (labels.model, labels.environment) == ("llama-3-8b", "staging")


def test_kubernetes_pod_with_containerd_gives_pod_uid_with_dashes() -> None:
    found = attribute(1002, PROC)
    assert (found.container_id, found.pod_uid) == (CID, POD)
    # job type is matched without regard to case; W&B run id is the experiment
    assert found.labels.job_type == JobType.inference
    assert found.labels.experiment_id == "w-1"


def test_kubernetes_pod_with_cri_o_and_an_unknown_job_type_kept_as_other() -> None:
    found = attribute(1003, PROC)
    assert (found.container_id, found.pod_uid) == (CID2, POD)
    assert found.labels.job_type == JobType.other


def test_systemd_session_is_no_container_and_mlflow_names_the_experiment() -> None:
    found = attribute(1004, PROC)
    assert (found.container_id, found.pod_uid) == (None, None)
    assert found.labels.job_id is None and found.labels.experiment_id == "5c9e0b"


def test_cgroup_v1_kubepods_with_cgroupfs_driver() -> None:
    found = attribute(1005, PROC)
    assert (found.container_id, found.pod_uid) == (CID, POD)
    assert (found.labels.job_id, found.labels.team) == ("99", "vision")


def test_slurm_job_without_gpuledger_variables_uses_slurm_and_mlflow() -> None:
    found = attribute(1006, PROC)
    assert found.name == "srun python"
    assert (found.container_id, found.pod_uid) == (None, None)
    labels = found.labels
    assert (labels.job_id, labels.team, labels.experiment_id) == ("4242", "physics", "mlf-1")


def test_unreadable_environment_still_gives_the_container() -> None:
    found = attribute(1007, PROC)
    assert found.container_id == CID2
    assert found.labels.job_id is None


def test_a_process_that_is_gone_gives_nothing_and_no_error() -> None:
    found = attribute(999_999, PROC)
    assert (found.name, found.container_id, found.pod_uid, found.labels.job_id) == (
        None,
        None,
        None,
        None,
    )
    assert ProcAttributor(PROC)(999_999).labels.job_id is None


def test_environment_parsing_skips_malformed_entries_and_bounds_long_values() -> None:
    env = parse_environ(b"A=1\0broken\0=nokey\0GPULEDGER_JOB_ID=" + b"x" * 300 + b"\0B=a=b\0")
    assert env["A"] == "1" and env["B"] == "a=b" and "broken" not in env
    assert len(labels_from_environ(env).job_id or "") == 256
    assert labels_from_environ({"GPULEDGER_JOB_ID": "  "}).job_id is None


def test_containerd_with_the_cgroupfs_driver_on_cgroup_v2() -> None:
    found = attribute(1008, PROC)  # k3s, kind: /kubepods/<qos>/pod<uid>/<container>
    assert (found.container_id, found.pod_uid, found.labels.job_id) == (CID, POD, "k3s-job")


def test_rootless_podman_with_a_container_subgroup() -> None:
    found = attribute(1009, PROC)
    assert (found.container_id, found.pod_uid) == (CID2, None)
    assert found.labels.experiment_id == "w-9"


def test_slurm_job_comes_from_the_cgroup_when_the_environment_is_unreadable() -> None:
    found = attribute(1010, PROC)  # no environ: the agent lacks CAP_SYS_PTRACE
    assert found.labels.job_id == "5150" and found.container_id is None


def test_an_agent_in_its_own_cgroup_namespace_still_finds_the_pod() -> None:
    found = attribute(1011, PROC)  # host paths seen from a DaemonSet: "/../../kubepods.slice/…"
    assert (found.container_id, found.pod_uid) == (CID2, POD)
    assert found.name == "tritonserver" and found.labels.job_type == JobType.inference


def test_docker_on_cgroup_v1_with_the_systemd_driver_and_explicit_labels_first() -> None:
    found = attribute(1012, PROC)
    assert found.container_id == CID
    assert found.labels.job_id == "explicit"  # GPULEDGER_JOB_ID wins over SLURM_JOB_ID


def test_nerdctl_container_without_environment() -> None:
    found = attribute(1013, PROC)
    assert (found.container_id, found.pod_uid, found.labels.job_id) == (CID, None, None)


def test_the_test_process_itself_is_attributed_from_its_own_proc() -> None:
    found = ProcAttributor()(os.getpid())
    assert found.name == Path("/proc/self/comm").read_text().strip()
    own_cgroup = Path("/proc/self/cgroup").read_text()
    assert (found.container_id, found.pod_uid) == parse_cgroup(own_cgroup)
    assert found.labels.job_id == os.environ.get("GPULEDGER_JOB_ID", os.environ.get("SLURM_JOB_ID"))


def test_podman_and_bare_v1_docker_paths() -> None:
    assert parse_cgroup(f"0::/user.slice/user-1000.slice/user@1000.service/libpod-{CID}.scope") == (
        CID,
        None,
    )
    assert parse_cgroup(f"4:memory:/docker/{CID}\n") == (CID, None)
    conmon = f"0::/kubepods.slice/kubepods-pod{POD.replace('-', '_')}.slice/crio-conmon-{CID}.scope"
    assert parse_cgroup(conmon) == (None, POD)  # the container monitor is not the container


def test_cache_reads_proc_once_per_process_and_rereads_a_reused_pid(tmp_path: Path) -> None:
    shutil.copytree(PROC / "1001", tmp_path / "1001")
    attributor = ProcAttributor(tmp_path, revalidate_s=0.0)
    assert attributor(1001).labels.job_id == "train-42"
    environ = tmp_path / "1001" / "environ"
    environ.write_bytes(b"GPULEDGER_JOB_ID=other\0")
    assert attributor(1001).labels.job_id == "train-42"  # same process: cached
    stat = tmp_path / "1001" / "stat"
    stat.write_text(stat.read_text().replace(" 51001 ", " 61001 "))  # a new process, same pid
    assert attributor(1001).labels.job_id == "other"
    attributor.prune(set())
    environ.write_bytes(b"GPULEDGER_JOB_ID=third\0")
    assert attributor(1001).labels.job_id == "third"


def test_a_process_on_the_gpu_costs_no_proc_read_until_it_is_revalidated(tmp_path: Path) -> None:
    shutil.copytree(PROC / "1001", tmp_path / "1001")
    attributor = ProcAttributor(tmp_path, revalidate_s=3600.0)
    assert attributor(1001).labels.job_id == "train-42"
    shutil.rmtree(tmp_path / "1001")
    # still on the GPU, within its revalidation period: answered from the cache
    assert attributor(1001).labels.job_id == "train-42"
    attributor.prune({1001})
    assert attributor(1001).labels.job_id == "train-42"
    attributor.prune(set())  # it left the GPUs: its lifetime, as far as we know, is over
    assert attributor(1001).labels.job_id is None


@pytest.fixture
def labelled_child() -> Iterator[subprocess.Popen[bytes]]:
    env = {
        **os.environ,
        "GPULEDGER_JOB_ID": "child-job",
        "GPULEDGER_TEAM": "agents",
        "GPULEDGER_JOB_TYPE": "tuning",
    }
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"], env=env)
    try:
        yield child
    finally:
        child.kill()
        child.wait()


def test_labels_of_a_real_process_come_from_its_own_proc(
    labelled_child: subprocess.Popen[bytes],
) -> None:
    attributor = ProcAttributor()
    deadline = time.monotonic() + 5
    # the child's environment is in place once exec has happened
    while attributor(labelled_child.pid).labels.job_id is None and time.monotonic() < deadline:
        attributor.prune(set())
        time.sleep(0.02)
    found = attributor(labelled_child.pid)
    assert found.labels.job_id == "child-job"
    assert found.labels.team == "agents" and found.labels.job_type == JobType.tuning
    assert found.name is not None and found.name.startswith("python")
    labelled_child.kill()
    labelled_child.wait()
    attributor.prune(set())  # the reader prunes what left the GPUs after every read
    assert attributor(labelled_child.pid).labels.job_id is None  # gone: nothing, no error
