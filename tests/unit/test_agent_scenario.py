"""The scenario engine: a fleet as a pure function of scenario time."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from gpuledger.agents.runner import DEMO_SCENARIO
from gpuledger.agents.sim.engine import Scenario
from gpuledger.agents.sim.spec import ScenarioError
from gpuledger.schema.messages import JobEvent, JobState, NodeInfo, UsageEvent

T0 = 1_700_000_000.0
UUID = re.compile(r"^GPU-[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
MIG_UUID = re.compile(r"^MIG-[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


def fleet(**job: Any) -> dict[str, Any]:
    """One node, two H100s and an A100 in MIG mode, and one job given by the test."""
    return {
        "scenario": {"seed": 3},
        "nodes": [
            {
                "name": "n1",
                "provider": "aws",
                "region": "us-east-1",
                "gpus": [
                    {"name": "NVIDIA H100 80GB HBM3", "count": 2},
                    {"name": "NVIDIA A100-SXM4-80GB", "mig": ["3g.40gb", "1g.10gb"]},
                ],
            }
        ],
        "jobs": [{"job_id": "j-{cycle}", "node": "n1", "gpus": [0], **job}],
    }


def test_same_scenario_and_time_give_the_same_hardware_in_two_loads() -> None:
    first = Scenario.load(DEMO_SCENARIO, origin=T0)
    second = Scenario.load(DEMO_SCENARIO, origin=T0)
    for node in first.node_names:
        for t in (T0 + 1, T0 + 333.5, T0 + 4000):
            assert first.hardware(node, t) == second.hardware(node, t)
    assert first.process_utilization("aws-p5-01", 0, T0 + 50, T0 + 60) == (
        second.process_utilization("aws-p5-01", 0, T0 + 50, T0 + 60)
    )
    assert first.events_between(T0, T0 + 3600) == second.events_between(T0, T0 + 3600)


def test_another_seed_gives_another_but_same_shaped_fleet() -> None:
    data = fleet(profile="busy")
    a = Scenario.from_dict(data, origin=T0)
    data["scenario"]["seed"] = 4
    b = Scenario.from_dict(data, origin=T0)
    utils_a = [a.hardware("n1", T0 + s).gpus[0].util_gpu for s in range(30, 90)]
    utils_b = [b.hardware("n1", T0 + s).gpus[0].util_gpu for s in range(30, 90)]
    assert utils_a != utils_b
    assert a.gpus("n1") == b.gpus("n1")  # UUIDs depend on node and index only


def test_gpu_uuids_are_nvml_shaped_and_stable_per_node_and_index() -> None:
    scenario = Scenario.from_dict(fleet(), origin=T0)
    gpus = scenario.gpus("n1")
    assert all(UUID.match(g.uuid) for g in gpus)
    assert len({g.uuid for g in gpus}) == 3
    mig = gpus[2].mig
    assert [m.profile for m in mig] == ["3g.40gb", "1g.10gb"]
    assert all(MIG_UUID.match(m.uuid) for m in mig)
    assert [m.slices for m in mig] == [3, 1]
    assert mig[1].memory_total_bytes == 9728 * 1024 * 1024  # what NVML reports for 1g.10gb


def test_demo_fleet_shows_every_situation_the_design_asks_for() -> None:
    scenario = Scenario.load(DEMO_SCENARIO, origin=T0)
    t = T0 + 300
    aws = scenario.hardware("aws-p5-01", t)
    gcp = scenario.hardware("gcp-g2-01", t)
    lam = scenario.hardware("lambda-a100-01", t)
    assert sum(len(h.gpus) for h in (aws, gcp, lam)) == 14
    names = {g.gpu.name for h in (aws, gcp, lam) for g in h.gpus}
    assert {g.gpu.name for h in (aws, gcp, lam) for g in h.gpus if g.gpu.gpm} == {
        "NVIDIA H100 80GB HBM3"
    }
    assert names == {"NVIDIA H100 80GB HBM3", "NVIDIA L4", "NVIDIA A100-SXM4-80GB"}
    # busy training on four GPUs, an idle allocated GPU
    assert all(g.util_gpu > 0.7 for g in aws.gpus[:4])
    assert aws.gpus[4].processes and aws.gpus[4].util_gpu < 0.05
    # tiny kernels: busy nearly all the time on a few percent of the SMs (GPM)
    tiny = aws.gpus[6]
    assert tiny.gpu.gpm and tiny.util_gpu > 0.95 and tiny.activity.sm_active < 0.05
    # a MIG H100: a canary on slice 0, an idle notebook on slice 2, two slices unallocated
    h100_mig = aws.gpus[7]
    assert [bool(m.processes) for m in h100_mig.mig] == [True, False, True, False]
    assert h100_mig.mig[2].activity.sm_active == 0.0 < h100_mig.mig[0].activity.sm_active
    # one L4 shared by two processes of two jobs
    shared = gcp.gpus[2].processes
    assert len({p.job_id for p in shared}) == 2
    # a MIG A100 with two of its four instances in use
    mig = lam.gpus[0]
    assert mig.gpu.mig_enabled and len(mig.mig) == 4
    assert [bool(m.processes) for m in mig.mig] == [True, False, True, False]
    # over time a job finishes and another fails
    states = {
        m.state
        for topic, _, m in scenario.events_between(T0, T0 + 3600)
        if topic == "jobs" and isinstance(m, JobEvent)
    }
    assert {JobState.running, JobState.succeeded, JobState.failed} <= states


def test_explicit_job_announces_its_gpus_at_start_and_its_final_state_at_end() -> None:
    scenario = Scenario.from_dict(
        fleet(start_s=10, end_s=70, repeat_every_s=100, final_state="failed", team="t"),
        origin=T0,
    )
    events = [e for e in scenario.events_between(T0, T0 + 250) if e[0] == "jobs"]
    assert [(key, m.state, m.ts) for _, key, m in events if isinstance(m, JobEvent)] == [
        ("j-0", JobState.running, T0 + 10),
        ("j-0", JobState.failed, T0 + 70),
        ("j-1", JobState.running, T0 + 110),
        ("j-1", JobState.failed, T0 + 170),
        ("j-2", JobState.running, T0 + 210),
    ]
    start, end = events[0][2], events[1][2]
    assert isinstance(start, JobEvent) and isinstance(end, JobEvent)
    assert start.gpu_uuids == [scenario.gpus("n1")[0].uuid]
    assert (start.started_at, start.ended_at) == (T0 + 10, None)
    assert (end.started_at, end.ended_at, end.team) == (T0 + 10, T0 + 70, "t")


def test_a_job_runs_on_its_gpu_only_during_its_cycles() -> None:
    scenario = Scenario.from_dict(fleet(start_s=10, end_s=70, repeat_every_s=100), origin=T0)

    def pids(t: float) -> list[int]:
        return [p.pid for p in scenario.hardware("n1", t).gpus[0].processes]

    assert pids(T0 + 10) == []  # reading at 10 reports the second [9, 10)
    assert pids(T0 + 11) != []
    assert pids(T0 + 70) != []  # the second [69, 70) is the job's last
    assert pids(T0 + 71) == []
    assert pids(T0 + 111) != [] and pids(T0 + 111) != pids(T0 + 11)  # a new process per cycle


def test_labelled_job_sends_no_job_event_but_its_processes_carry_the_labels() -> None:
    scenario = Scenario.from_dict(
        fleet(announce="labels", team="search", job_type="inference", runtime="kubernetes"),
        origin=T0,
    )
    assert [e for e in scenario.events_between(T0, T0 + 100) if e[0] == "jobs"] == []
    (process,) = scenario.hardware("n1", T0 + 5).gpus[0].processes
    assert process.env["GPULEDGER_JOB_ID"] == "j-0"
    assert process.env["GPULEDGER_TEAM"] == "search"
    assert process.env["GPULEDGER_JOB_TYPE"] == "inference"
    assert "kubepods" in process.cgroup and "cri-containerd-" in process.cgroup


def test_job_in_a_mig_instance_is_announced_with_the_instance_uuid() -> None:
    scenario = Scenario.from_dict(fleet(gpus=[2], mig_instance=1), origin=T0)
    (_, _, event) = next(e for e in scenario.events_between(T0, T0 + 1) if e[0] == "jobs")
    assert isinstance(event, JobEvent)
    assert event.gpu_uuids == [scenario.gpus("n1")[2].mig[1].uuid]
    gpu = scenario.hardware("n1", T0 + 30).gpus[2]
    assert [bool(m.processes) for m in gpu.mig] == [False, True]


def test_usage_events_split_at_any_point_count_every_request_once() -> None:
    scenario = Scenario.from_dict(
        fleet(profile="bursty", requests_per_s=20, tokens_per_request=100, end_s=95),
        origin=T0,
    )

    def usage(t0: float, t1: float) -> list[UsageEvent]:
        return [m for topic, _, m in scenario.events_between(t0, t1) if isinstance(m, UsageEvent)]

    whole = usage(T0, T0 + 200)
    parts = usage(T0, T0 + 37.5) + usage(T0 + 37.5, T0 + 200)
    assert whole == parts
    assert [u.ts for u in whole] == [T0 + 10 * k for k in range(1, 10)] + [T0 + 95]
    assert sum(u.requests for u in whole) > 0 and all(u.tokens >= u.requests for u in whole)


def test_node_info_comes_at_the_origin_and_then_every_period() -> None:
    scenario = Scenario.from_dict(fleet(), origin=T0)
    infos = [m for _, _, m in scenario.events_between(T0, T0 + 7300) if isinstance(m, NodeInfo)]
    assert [i.ts for i in infos] == [T0, T0 + 3600, T0 + 7200]
    assert (infos[0].provider, infos[0].region) == ("aws", "us-east-1")


def test_per_process_samples_are_only_those_after_the_timestamp_asked() -> None:
    scenario = Scenario.from_dict(fleet(), origin=T0)
    samples = scenario.process_utilization("n1", 0, T0 + 40, T0 + 42)
    assert [s.ts_us for s in samples] == [
        round((T0 + x) * 1e6) for x in (40.123, 40.623, 41.123, 41.623)
    ]
    later = scenario.process_utilization("n1", 0, samples[-1].ts_us / 1e6, T0 + 42)
    assert later == []
    assert scenario.process_utilization("n1", 2, T0, T0 + 42) == []  # MIG: not supported


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"jobs": [{"job_id": "x", "node": "nowhere", "gpus": [0]}]}, "node 'nowhere'"),
        ({"jobs": [{"job_id": "x", "node": "n1", "gpus": [9]}]}, "gpus lists 9"),
        ({"jobs": [{"job_id": "x", "node": "n1", "gpus": [2]}]}, "set mig_instance"),
        ({"jobs": [{"job_id": "x-{day}", "node": "n1", "gpus": [0]}]}, "{cycle} and {run}"),
        (
            {
                "jobs": [
                    {"job_id": "x", "node": "n1", "gpus": [0], "end_s": 50, "repeat_every_s": 10}
                ]
            },
            "must fit in repeat_every_s",
        ),
        ({"jobs": [{"job_id": "x", "node": "n1", "gpus": [0], "profile": "lazy"}]}, "profile"),
        ({"nodes": [{"name": "n1", "gpus": [{"name": "Mystery GPU"}]}]}, "set memory_mib"),
        (
            {
                "nodes": [
                    {
                        "name": "n1",
                        "gpus": [{"name": "NVIDIA H100 80GB HBM3", "mig": ["4g.40gb", "4g.40gb"]}],
                    }
                ]
            },
            "use 8 slices",
        ),
        (
            {"nodes": [{"name": "n1", "gpus": [{"name": "NVIDIA L4", "mig": []}]}]},
            "does not support MIG",
        ),
    ],
)
def test_a_bad_scenario_is_refused_with_the_field_and_the_fix(
    change: dict[str, Any], message: str
) -> None:
    data = {**fleet(), **change}
    with pytest.raises(ScenarioError, match=re.escape(message)):
        Scenario.from_dict(data, origin=T0)


def test_unreadable_or_invalid_files_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(ScenarioError, match="cannot read scenario file"):
        Scenario.load(tmp_path / "missing.toml", origin=T0)
    bad = tmp_path / "bad.toml"
    bad.write_text("[[nodes]\nname = 1\n")
    with pytest.raises(ScenarioError, match=r"bad\.toml: not valid TOML"):
        Scenario.load(bad, origin=T0)
    no_origin = tmp_path / "no_origin.toml"
    no_origin.write_text('[[nodes]]\nname = "a"\ngpus = [{ name = "NVIDIA L4" }]\n')
    with pytest.raises(ScenarioError, match="no origin"):
        Scenario.load(no_origin)
    assert Scenario.load(no_origin, origin=T0).node_names == ["a"]
