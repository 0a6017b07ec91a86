"""`gpuledger report`: one offline HTML file whose figures agree with SQL on the cost facts."""

from __future__ import annotations

import re
from datetime import datetime
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from clickhouse_connect.driver.client import Client
from typer.testing import CliRunner

from gpuledger.cli import app


class Figures(HTMLParser):
    """Collects (data-figure, data-key) -> data-value from the report."""

    def __init__(self) -> None:
        super().__init__()
        self.values: dict[tuple[str, str], float | None] = {}
        self.tags: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        found = dict(attrs)
        if found.get("data-figure"):
            value = found.get("data-value")
            key = (found["data-figure"] or "", found.get("data-key") or "")
            self.values[key] = None if value is None else float(value)


def make_report(url: str, out: Path, *window: str) -> tuple[str, Figures]:
    result = CliRunner().invoke(app, ["--store", url, "report", *window, "--out", str(out)])
    assert result.exit_code == 0, result.output
    parser = Figures()
    html = out.read_text(encoding="utf-8")
    parser.feed(html)
    return html, parser


FACTS = "FROM gpuledger.cost_facts WHERE ts >= {start:String} AND ts < {end:String}"
TWO_WEEKS = {"start": "2026-11-02", "end": "2026-11-16"}


def sql_by_key(client: Client, select: str, params: dict[str, str]) -> dict[str, float]:
    return {str(k): float(v) for k, v in client.query(select, parameters=params).result_rows}


def test_report_figures_agree_with_sql_on_the_cost_facts(
    seeded_url: str, seeded: Client, tmp_path: Path
) -> None:
    _, report = make_report(
        seeded_url, tmp_path / "report.html", "--from", "2026-11-02", "--to", "2026-11-16"
    )
    figures = report.values
    totals = seeded.query(
        "SELECT sum(cost_usd * sign), sumIf(cost_usd * sign, allocated = 1), "
        "sumIf(cost_usd * sign, allocated = 0), sumIf(idle_cost_usd * sign, allocated = 1), "
        "sum(duration_s * share * price_missing * sign) / 3600, "
        "sumIf(util_sm * duration_s * share * sign, util_sm IS NOT NULL) / "
        "sumIf(duration_s * share * sign, util_sm IS NOT NULL) " + FACTS,
        parameters=TWO_WEEKS,
    ).result_rows[0]
    names = [
        "total_cost_usd",
        "allocated_cost_usd",
        "unallocated_cost_usd",
        "idle_cost_usd",
        "price_missing_gpu_hours",
        "mean_util_sm",
    ]
    for name, want in zip(names, totals, strict=True):
        assert figures[(name, "")] == pytest.approx(want, abs=1e-6), name
    # By hand: 20 + 16 + 12 + 2.4 + 4/7 + 24 + 2 + 8 (unallocated H100) + 0 (unpriced).
    assert figures[("total_cost_usd", "")] == pytest.approx(84.9714, abs=1e-4)

    per_team = sql_by_key(
        seeded,
        "SELECT if(team = '', '(unallocated)', team), sum(cost_usd * sign) "
        + FACTS
        + " GROUP BY team",
        TWO_WEEKS,
    )
    assert {k: v for (f, k), v in figures.items() if f == "team_spend"} == pytest.approx(per_team)
    per_project = sql_by_key(
        seeded,
        "SELECT project, sum(cost_usd * sign) " + FACTS + " AND allocated = 1 GROUP BY project",
        TWO_WEEKS,
    )
    assert {k: v for (f, k), v in figures.items() if f == "project_spend"} == pytest.approx(
        per_project
    )
    idle = sql_by_key(
        seeded,
        "SELECT team, sum(idle_cost_usd * sign) " + FACTS + " AND allocated = 1 GROUP BY team",
        TWO_WEEKS,
    )
    assert {k: v for (f, k), v in figures.items() if f == "team_idle"} == pytest.approx(idle)

    # EffectiveCost by hand: detector 48 / (3/3 x 6.1/12); llm: none succeeded.
    assert figures[("project_effective_cost", "detector")] == pytest.approx(48 / (6.1 / 12))
    assert figures[("project_effective_cost", "detector-api")] == pytest.approx(2 / 0.3)
    assert figures[("project_effective_cost", "llm")] is None
    runs = sql_by_key(
        seeded, "SELECT job_id, cost_usd FROM gpuledger.job_costs WHERE job_type = 'training'", {}
    )
    assert {k: v for (f, k), v in figures.items() if f == "run_cost"} == pytest.approx(runs)
    assert figures[("training_avg_cost", "detector")] == pytest.approx(16.0)
    per_1k = sql_by_key(
        seeded,
        "SELECT c.job_id, 1000 * c.usd / u.requests FROM "
        "(SELECT job_id, sum(cost_usd * sign) AS usd " + FACTS + " AND job_type = 'inference' "
        "GROUP BY job_id) AS c JOIN (SELECT job_id, sum(requests) AS requests "
        "FROM gpuledger.usage GROUP BY job_id) AS u ON u.job_id = c.job_id",
        TWO_WEEKS,
    )
    assert per_1k == pytest.approx({"infer-e1": 24000 / 18000, "infer-e2": 4.0})
    assert {k: v for (f, k), v in figures.items() if f == "endpoint_usd_per_1k"} == pytest.approx(
        per_1k
    )
    # 30 idle endpoint hours at $0.50 over 14 days, scaled to 30 days.
    assert figures[("recommendation_monthly", "scale_to_zero:infer-e1")] == pytest.approx(
        15.0 * 30 / 14
    )


def test_report_is_one_self_contained_file_with_charts(seeded_url: str, tmp_path: Path) -> None:
    html, report = make_report(
        seeded_url, tmp_path / "report.html", "--from", "2026-11-02", "--to", "2026-11-16"
    )
    assert report.tags.count("svg") >= 7
    assert "script" not in report.tags and "link" not in report.tags
    assert "img" not in report.tags and "iframe" not in report.tags
    # The only URL is SVG's XML namespace, which nothing fetches.
    assert set(re.findall(r"https?://[^'\" ]+", html)) == {"http://www.w3.org/2000/svg"}
    assert "url(" not in html and "@import" not in html


@pytest.mark.parametrize(
    ("window", "spend", "teams"),
    [
        # Nov 2 only, in hourly bars: 20 + 2.4 + 4/7 + 12 + 8 (unallocated H100).
        (("--period", "24h", "--to", "2026-11-03"), 42.9714, {"vision", "nlp", "(unallocated)"}),
        # The first week: everything but train-a3's $12 on Nov 10.
        (("--period", "7d", "--to", "2026-11-09"), 72.9714, {"vision", "nlp", "(unallocated)"}),
    ],
)
def test_a_period_ending_at_a_time_reports_that_period_only(
    seeded_url: str, tmp_path: Path, window: tuple[str, ...], spend: float, teams: set[str]
) -> None:
    _, report = make_report(seeded_url, tmp_path / "report.html", *window)
    assert report.values[("total_cost_usd", "")] == pytest.approx(spend, abs=1e-4)
    assert {k for (f, k) in report.values if f == "team_spend"} == teams


def test_the_guardrails_section_sums_what_the_guard_saved_in_the_period(
    seeded_url: str, seeded: Client, tmp_path: Path
) -> None:
    def step(day: str, team: str, kind: str, dry_run: int, outcome: str, usd: float) -> list[Any]:
        when = datetime.fromisoformat(f"{day}T12:00:00+00:00")
        return [when, "idle", f"job@{day}", 1, kind, "requeue", dry_run, "GPU-1", "n1",
                f"job-{day}", team, "p", when, usd, "idle 2 h", outcome]  # fmt: skip

    columns = ["decided_at", "policy", "target", "step", "kind", "action", "dry_run",
               "gpu_uuid", "node", "job_id", "team", "project", "idle_since", "usd_at_stake",
               "reason", "outcome"]  # fmt: skip
    seeded.insert(
        "gpuledger.guard_actions",
        [
            step("2026-11-05", "vision", "act", 0, "done", 10.0),
            step("2026-11-06", "vision", "act", 0, "failed: no Slurm access", 7.0),  # not saved
            step("2026-11-07", "vision", "act", 1, "dry_run", 3.0),
            step("2026-11-08", "research", "notify", 0, "notified", 99.0),  # a notice saves none
            step("2026-11-20", "vision", "act", 0, "done", 50.0),  # after the period
        ],
        column_names=columns,
    )
    html, report = make_report(
        seeded_url, tmp_path / "report.html", "--from", "2026-11-02", "--to", "2026-11-16"
    )
    saved = {k: v for (f, k), v in report.values.items() if f == "guard_saved"}
    would = {k: v for (f, k), v in report.values.items() if f == "guard_would_save"}
    assert saved == {"2026-11:vision": 10.0}
    assert would == {"2026-11:vision": 3.0}
    assert "<h2>Guardrails</h2>" in html
    # The whole-time view agrees: the November step after the period counts there.
    assert seeded.query(
        "SELECT saved_usd, would_save_usd FROM gpuledger.guard_savings WHERE team = 'vision'"
    ).result_rows == [(60.0, 3.0)]
    _, empty = make_report(
        seeded_url, tmp_path / "october.html", "--from", "2026-10-01", "--to", "2026-10-15"
    )
    assert not any(f.startswith("guard_") for f, _ in empty.values)


def test_the_funnel_section_narrows_stage_by_stage_as_the_facts_say(
    seeded_url: str, seeded: Client, tmp_path: Path
) -> None:
    _, report = make_report(
        seeded_url, tmp_path / "report.html", "--from", "2026-11-02", "--to", "2026-11-16"
    )
    stages = ("funnel_total", "funnel_allocated", "funnel_active", "funnel_effective")
    got = {stage: {k: v for (f, k), v in report.values.items() if f == stage} for stage in stages}
    want = seeded.query(
        "SELECT team, gpu_model, sum(cost_usd * sign), sumIf(cost_usd * sign, allocated = 1), "
        "sumIf(cost_usd * sign, allocated = 1 AND idle = 0), "
        "ifNull(sumIf(cost_usd * sign * ifNull(sm_active, util_sm), allocated = 1 AND idle = 0 "
        "AND ifNull(sm_active, util_sm) IS NOT NULL), 0) " + FACTS + " GROUP BY team, gpu_model",
        parameters=TWO_WEEKS,
    ).result_rows
    for team, model, *figures in want:
        key = f"{team}:{model}"
        for stage, figure in zip(stages, figures, strict=True):
            assert got[stage][key] == pytest.approx(figure, abs=1e-9), (stage, key)
        total, allocated, active, effective = figures
        assert total + 1e-9 >= allocated >= active - 1e-9 and active + 1e-9 >= effective
    # By hand, the unallocated H100 hours: $8 in the total, nothing past it.
    assert got["funnel_total"][":H100"] == pytest.approx(8.0)
    assert got["funnel_allocated"][":H100"] == 0.0
    # vision's H100s by SM activity where they have it: 20 x 0.1 + 16 x 0.45 + 12 x 0.4
    assert got["funnel_effective"]["vision:H100"] == pytest.approx(2.0 + 7.2 + 4.8)
