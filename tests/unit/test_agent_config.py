"""The agent's options, defined once: `gpuledger agent` and `python -m gpuledger.agents`."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from gpuledger import runtime
from gpuledger.agents.config import AgentConfig, options, parse_argv, to_argv
from gpuledger.cli import app


def test_a_config_crosses_the_exec_unchanged() -> None:
    config = AgentConfig(
        "kafka:9092",
        topic_prefix="t.",
        simulate=Path("fleet.toml"),
        nodes=("a", "b"),
        interval_s=0.25,
        duration_s=60.0,
        speed=4.0,
        node_name="n1",
        proc_root=Path("/host/proc"),
        spool_dir=Path("spool"),
        spool_max_mb=1.5,
        metrics_port=9400,
        metrics_addr="127.0.0.1",
        kubelet_url="https://10.0.0.1:10250/pods",
        kubelet_insecure_tls=True,
    )
    assert parse_argv(to_argv(config)) == config
    assert parse_argv(["--bootstrap", "kafka:9092"]) == AgentConfig("kafka:9092")
    every_option = {o.name for o in options()}
    assert {n for n in every_option if getattr(config, n) == getattr(AgentConfig("x"), n)} == set()


def exec_argv(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, *args: str, **env: str) -> list[str]:
    """The argv `gpuledger agent ARGS` would exec the agent with."""
    execs: list[list[str]] = []

    def execv(_path: str, argv: list[str]) -> None:
        execs.append(argv)
        raise SystemExit(0)

    monkeypatch.setattr(runtime.os, "execv", execv)
    env = {"GPULEDGER_BOOTSTRAP": "127.0.0.1:9", "GPULEDGER_DATA_DIR": str(tmp_path), **env}
    done = CliRunner().invoke(app, ["agent", *args], env=env)
    assert done.exit_code == 0 and len(execs) == 1, done.output
    assert execs[0][1:3] == ["-m", "gpuledger.agents"]
    return execs[0][3:]


def test_gpuledger_interval_s_sets_the_sampling_interval(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    config = parse_argv(exec_argv(monkeypatch, tmp_path, GPULEDGER_INTERVAL_S="0.25"))
    assert config.interval_s == 0.25
    assert config.bootstrap == "127.0.0.1:9"
    flag = exec_argv(monkeypatch, tmp_path, "--interval", "2", GPULEDGER_INTERVAL_S="0.25")
    assert parse_argv(flag).interval_s == 2.0
    assert parse_argv(exec_argv(monkeypatch, tmp_path)).interval_s == 1.0


def test_the_cli_passes_every_agent_option(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    argv = exec_argv(
        monkeypatch,
        tmp_path,
        "--simulate",
        "fleet.toml",
        "--node",
        "a",
        "--node",
        "b",
        "--kubelet-insecure-tls",
        GPULEDGER_METRICS_PORT="9400",
    )
    config = parse_argv(argv)
    assert (config.simulate, config.nodes) == (Path("fleet.toml"), ("a", "b"))
    assert config.kubelet_insecure_tls and config.metrics_port == 9400
    assert config.spool_dir == tmp_path / "agent-spool" / "simulate-fleet"
