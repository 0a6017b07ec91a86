"""The GPU node check's readings of nvidia-smi and DCGM output (recorded here, in the tools'
formats), and how it averages the agent's samples per phase."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from bench.gpu_node_check import parse_dcgmi, parse_dmon, phase_means

FIXTURES = Path(__file__).parents[1] / "fixtures" / "gpu_node"


def test_dmon_lines_give_time_gpu_and_busy_percent_and_skip_headers_and_dashes() -> None:
    assert parse_dmon((FIXTURES / "dmon.txt").read_text()) == [
        ("10:00:01", 0, 98.0),
        ("10:00:01", 1, 0.0),
        ("10:00:02", 0, 100.0),
    ]


def test_dcgmi_lines_give_the_profiling_fields_per_gpu_and_skip_na() -> None:
    assert parse_dcgmi((FIXTURES / "dcgmi.txt").read_text()) == [
        (0, [0.812, 0.401, 0.53, 0.612]),
        (0, [0.031, 0.02, 0.0, 0.004]),
    ]


def test_phase_means_average_one_gpus_samples_inside_the_phase() -> None:
    samples: list[dict[str, Any]] = [
        {"gpu_index": 0, "ts": 100.0, "util_sm": 1.0, "sm_active": 0.02},
        {"gpu_index": 0, "ts": 101.0, "util_sm": 0.98, "sm_active": 0.04},
        {"gpu_index": 0, "ts": 102.0, "util_sm": 0.5, "sm_active": None},
        {"gpu_index": 1, "ts": 100.0, "util_sm": 0.0, "sm_active": 0.0},
        {"gpu_index": 0, "ts": 100.0, "mig_profile": "1g.10gb", "util_sm": 0.0},
        {"gpu_index": 0, "ts": 200.0, "util_sm": 0.1, "sm_active": 0.1},
    ]
    means = phase_means(samples, 0, 100.0, 103.0)
    assert means["util_sm"] == pytest.approx((1.0 + 0.98 + 0.5) / 3)
    assert means["sm_active"] == pytest.approx(0.03)
    assert means["tensor_active"] is None
