"""The HTML of `gpuledger report`: inline SVG charts, no script and no network. Every figure
the tests check carries `data-figure`, `data-key` and `data-value` attributes, so a reader (or
a test) can compare it with SQL.
"""

from __future__ import annotations

from collections.abc import Sequence
from html import escape

from gpuledger.analysts import charts
from gpuledger.analysts.report import (
    HALF,
    UNALLOCATED,
    ReportData,
    team_name,
)
from gpuledger.output import money

CSS = """
:root { --ink: #1f2328; --muted: #59636e; --line: #d8dee4; --bg: #f6f8fa; --accent: #4e79a7; }
* { box-sizing: border-box; }
body { margin: 0; background: var(--bg); color: var(--ink);
  font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; }
header { background: #1f2a37; color: #fff; padding: 22px 32px 18px; }
header h1 { margin: 0 0 4px; font-size: 22px; font-weight: 600; }
header p { margin: 0; color: #c9d1d9; }
main { max-width: 1120px; margin: 0 auto; padding: 20px 24px 40px; }
.cards { display: grid; grid-template-columns: repeat(auto-fit, minmax(160px, 1fr)); gap: 12px;
  margin-bottom: 18px; }
.card { background: #fff; border: 1px solid var(--line); border-radius: 8px; padding: 12px 14px; }
.card .label { color: var(--muted); font-size: 12px; text-transform: uppercase;
  letter-spacing: .04em; }
.card .value { font-size: 24px; font-weight: 600; margin-top: 2px; }
.card .note { color: var(--muted); font-size: 12px; }
section { background: #fff; border: 1px solid var(--line); border-radius: 8px;
  padding: 16px 18px; margin-bottom: 16px; }
section h2 { margin: 0 0 4px; font-size: 17px; }
section p.lead { margin: 0 0 10px; color: var(--muted); }
.grid2 { display: grid; grid-template-columns: 1fr 1fr; gap: 16px; }
@media (max-width: 900px) { .grid2 { grid-template-columns: 1fr; } }
table { border-collapse: collapse; width: 100%; margin-top: 8px; font-size: 13px; }
th, td { text-align: left; padding: 5px 8px; border-bottom: 1px solid var(--line);
  vertical-align: top; }
th { color: var(--muted); font-weight: 600; font-size: 12px; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
.kind { display: inline-block; padding: 1px 7px; border-radius: 10px; font-size: 12px;
  background: #e8eef6; color: #2a4a6f; white-space: nowrap; }
.small { color: var(--muted); font-size: 12px; }
td.nowrap { white-space: nowrap; }
code { font: 12px ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; background: #eef1f4;
  padding: 1px 4px; border-radius: 4px; }
footer { color: var(--muted); font-size: 12px; text-align: center; margin-top: 10px; }
"""


def _fig(name: str, key: str, value: float | None, text: str, cls: str = "num") -> str:
    data = "" if value is None else f" data-value='{value!r}'"
    return (
        f"<td class='{cls}' data-figure='{escape(name, quote=True)}' "
        f"data-key='{escape(key, quote=True)}'{data}>{escape(text)}</td>"
    )


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{value:.0%}"


def _usd(name: str, key: str, usd: float | None) -> str:
    """A figure in dollars."""
    return _fig(name, key, usd, money(usd))


def _hours(name: str, key: str, hours: float) -> str:
    """A figure in GPU-hours."""
    return _fig(name, key, hours, f"{hours:,.1f}")


def _share(name: str, key: str, value: float | None) -> str:
    """A figure in percent."""
    return _fig(name, key, value, _pct(value))


def _card(name: str, label: str, value: float | None, text: str, note: str = "") -> str:
    data = "" if value is None else f" data-value='{value!r}'"
    return (
        f"<div class='card'><div class='label'>{escape(label)}</div>"
        f"<div class='value' data-figure='{name}' data-key=''{data}>{escape(text)}</div>"
        f"<div class='note'>{escape(note)}</div></div>"
    )


def _table(
    labels: Sequence[str],
    figures: Sequence[str],
    rows: Sequence[str],
    empty: str = "No data in this period.",
) -> str:
    """A table whose text columns `labels` come first, then its right-aligned `figures`."""
    cells = "".join(f"<th>{escape(h)}</th>" for h in labels) + "".join(
        f"<th class='num'>{escape(h)}</th>" for h in figures
    )
    body = "".join(f"<tr>{row}</tr>" for row in rows)
    if not rows:
        columns = len(labels) + len(figures)
        body = f"<tr><td colspan='{columns}' class='small'>{escape(empty)}</td></tr>"
    return f"<table><thead><tr>{cells}</tr></thead><tbody>{body}</tbody></table>"


def _td(text: str, cls: str = "") -> str:
    return f"<td class='{cls}'>{escape(text)}</td>" if cls else f"<td>{escape(text)}</td>"


def _spend_section(data: ReportData) -> str:
    totals = {team: sum(values) for team, values in data.team_series.items()}
    rows = [
        _td(team) + _usd("team_spend", team, total)
        for team, total in sorted(totals.items(), key=lambda kv: -kv[1])
    ]
    chart = charts.stacked_bars(
        data.buckets, data.team_series, title=f"Spend per {data.bucket_unit} by team"
    )
    return (
        f"<section><h2>Spend over time by team</h2><p class='lead'>GPU cost per "
        f"{data.bucket_unit}, stacked by the team that held the GPUs; "
        f"{UNALLOCATED} is GPU time no job held.</p>{chart}"
        + _table(["team"], ["spend"], rows)
        + "</section>"
    )


def _projects_section(data: ReportData) -> str:
    top = data.projects[:12]
    chart = charts.hbars(
        [p.project or "(no project)" for p in top],
        [p.cost_usd for p in top],
        title="Spend by project",
        width=HALF,
    )
    rows = [
        _td(p.project or "(no project)")
        + _usd("project_spend", p.project, p.cost_usd)
        + _hours("project_gpu_hours", p.project, p.gpu_hours)
        + _usd("project_idle", p.project, p.idle_cost_usd)
        for p in data.projects
    ]
    return (
        "<section><h2>Spend by project</h2><p class='lead'>Allocated GPU cost per project."
        f"</p>{chart}"
        + _table(["project"], ["spend", "GPU-hours", "idle cost"], rows)
        + "</section>"
    )


def _idle_section(data: ReportData) -> str:
    chart = charts.hbars(
        [team_name(t.team) for t in data.idle_by_team],
        [t.idle_cost_usd for t in data.idle_by_team],
        title="Idle cost by team",
        bar_color=charts.PALETTE[3],
        width=HALF,
    )
    rows = [
        _td(team_name(t.team))
        + _usd("team_idle", t.team, t.idle_cost_usd)
        + _hours("team_idle_gpu_hours", t.team, t.idle_gpu_hours)
        + _share(
            "team_idle_share", t.team, t.idle_cost_usd / t.cost_usd if t.cost_usd > 1e-12 else None
        )
        for t in data.idle_by_team
    ]
    return (
        "<section><h2>Idle waste</h2><p class='lead'>What allocated GPUs cost while they "
        "computed nothing: cost x (1 − utilization), and the hours below the idle "
        f"threshold.</p>{chart}"
        + _table(["team"], ["idle cost", "idle GPU-hours", "of spend"], rows)
        + "</section>"
    )


def _effective_section(data: ReportData) -> str:
    rows = [
        _td(e.project)
        + _usd("project_total_spend", e.project, e.total_spend_usd)
        + _td(f"{e.jobs_succeeded}/{e.jobs_finished}", "num")
        + _share("project_success_rate", e.project, e.job_success_rate)
        + _share("project_utilization", e.project, e.resource_utilization)
        + _usd("project_effective_cost", e.project, e.effective_cost_usd)
        for e in data.effective
    ]
    known = [e for e in data.effective if e.effective_cost_usd is not None]
    bars = charts.hbars(
        [e.project for e in known],
        [e.effective_cost_usd or 0.0 for e in known],
        title="EffectiveCost by project",
        bar_color=charts.PALETTE[6],
        width=HALF,
    )
    trend = charts.lines(
        data.weeks, data.weekly_effective, title="EffectiveCost week on week", width=HALF
    )
    return (
        "<section><h2>EffectiveCost</h2><p class='lead'>TotalSpend / (JobSuccessRate x "
        "ResourceUtilization): what the spend would be if every job succeeded "
        "and every GPU-second computed. Blank where no job succeeded or nothing was used: "
        f"an infinite cost is not a number.</p><div class='grid2'><div>{bars}</div>"
        f"<div>{trend}</div></div>"
        + _table(
            ["project"],
            ["spend", "succeeded", "success rate", "utilization", "EffectiveCost"],
            rows,
        )
        + "</section>"
    )


def _unit_section(data: ReportData) -> str:
    run_rows = [
        _td(r.job_id)
        + _td(f"{r.team}/{r.project}")
        + _td(r.state or "—")
        + _hours("run_gpu_hours", r.job_id, r.gpu_hours)
        + _share("run_util", r.job_id, r.mean_util_sm)
        + _usd("run_cost", r.job_id, r.cost_usd)
        for r in data.training_runs
    ]
    project_rows = [
        _td(p.project)
        + _td(f"{p.succeeded}/{p.runs}", "num")
        + _usd("training_avg_cost", p.project, p.avg_cost_usd)
        + _usd("training_cost_per_success", p.project, p.cost_per_successful_run_usd)
        for p in data.training_projects
    ]
    endpoint_rows = [
        _td(e.job_id)
        + _td(f"{e.team}/{e.project}")
        + _usd("endpoint_cost", e.job_id, e.cost_usd)
        + _fig("endpoint_requests", e.job_id, float(e.requests), f"{e.requests:,}")
        + _usd("endpoint_usd_per_1k", e.job_id, e.usd_per_1k_requests)
        for e in data.endpoints
    ]
    trend = charts.lines(
        data.endpoint_days,
        data.endpoint_daily,
        title="Cost per 1,000 requests by day",
        width=HALF,
    )
    return (
        "<section><h2>Unit costs</h2><p class='lead'>Cost per training run (runs that "
        "ended in the period) and cost per 1,000 inferences per endpoint.</p>"
        "<div class='grid2'><div>"
        + _table(
            ["project"], ["succeeded", "avg cost per run", "cost per successful run"], project_rows
        )
        + "</div><div>"
        + trend
        + "</div></div>"
        + _table(["training run", "team/project", "state"], ["GPU-hours", "util", "cost"], run_rows)
        + _table(
            ["endpoint", "team/project"], ["cost", "requests", "per 1k requests"], endpoint_rows
        )
        + "</section>"
    )


def _recommendations_section(data: ReportData) -> str:
    recs = data.recommendations
    chart = charts.hbars(
        [f"{r.kind.value}: {r.subject}" for r in recs[:10]],
        [r.monthly_saving_usd for r in recs[:10]],
        title="Monthly saving by recommendation",
        bar_color=charts.PALETTE[2],
    )
    rows = [
        f"<td><span class='kind'>{escape(r.kind.value)}</span></td>"
        + _td(r.subject, "nowrap")
        + f"<td>{escape(r.current)}<br><b>→ {escape(r.proposed)}</b>"
        f"<div class='small'>{escape(r.risk)}</div></td>"
        + _usd("recommendation_monthly", f"{r.kind.value}:{r.subject}", r.monthly_saving_usd)
        for r in recs
    ]
    return (
        "<section><h2>Recommendations</h2><p class='lead'>Savings at the price book's rates "
        "had the period's pattern run a whole month (30 days). Different kinds on the same "
        "job or GPU model overlap: do not add them up. <code>gpuledger recommend</code> lists "
        "them too."
        f"</p>{chart}"
        + _table(
            ["kind", "subject", "what and why"],
            ["per month"],
            rows,
            empty=(
                f"Nothing to recommend: {data.screening.describe()}."
                if data.screening and data.totals.cost_usd > 1e-12
                else "No data in this period."
            ),
        )
        + "</section>"
    )


def _funnel_section(data: ReportData) -> str:
    rows = []
    for f in data.funnel:
        key = f"{f.team}:{f.gpu_model}"
        stages = (
            ("total", f.total_usd),
            ("allocated", f.allocated_usd),
            ("active", f.active_usd),
            ("effective", f.effective_usd),
        )
        rows.append(
            _td(team_name(f.team))
            + _td(f.gpu_model)
            + "".join(_usd(f"funnel_{name}", key, usd) for name, usd in stages)
        )
    return (
        "<section><h2>Fleet funnel</h2><p class='lead'>What the GPUs cost, then the part "
        "held by jobs (allocated), the part of that the GPUs were busy (active: not idle), and "
        "that weighted by SM utilization (effective). Each stage is inside the one before; "
        f"{UNALLOCATED} is GPU time no job held.</p>"
        + _table(["team", "GPU model"], ["total", "allocated", "active", "effective"], rows)
        + "</section>"
    )


def _guard_section(data: ReportData) -> str:
    rows = [
        _td(g.month)
        + _td(team_name(g.team))
        + _td(f"{g.actions:,}", "num")
        + _usd("guard_saved", f"{g.month}:{g.team}", g.saved_usd)
        + _td(f"{g.dry_runs:,}", "num")
        + _usd("guard_would_save", f"{g.month}:{g.team}", g.would_save_usd)
        for g in data.guard_savings
    ]
    return (
        "<section><h2>Guardrails</h2><p class='lead'>What the guard's actions saved: the "
        "dollars the GPUs it stopped would have gone on costing (until the job's own end or "
        "the policy's horizon), per month and team. Dry runs apart: what enforcing the "
        "policies would have saved. <code>gpuledger actions</code> lists each step.</p>"
        + _table(
            ["month", "team"],
            ["actions", "saved", "dry runs", "would save"],
            rows,
            empty="No guardrail decisions in this period.",
        )
        + "</section>"
    )


def render(data: ReportData) -> str:
    """The whole report as one HTML document."""
    t = data.totals
    allocated_share = t.allocated_cost_usd / t.cost_usd if t.cost_usd > 1e-12 else None
    cards = "".join(
        _card(*card)
        for card in (
            (
                "total_cost_usd",
                "Spend",
                t.cost_usd,
                money(t.cost_usd),
                f"{t.gpu_hours:,.1f} GPU-hours",
            ),
            (
                "allocated_cost_usd",
                "Allocated to jobs",
                t.allocated_cost_usd,
                money(t.allocated_cost_usd),
                f"{_pct(allocated_share)} of spend",
            ),
            (
                "idle_cost_usd",
                "Idle cost on allocated GPUs",
                t.idle_cost_usd,
                money(t.idle_cost_usd),
                "cost x (1 − utilization)",
            ),
            (
                "unallocated_cost_usd",
                "Unallocated GPUs",
                t.unallocated_cost_usd,
                money(t.unallocated_cost_usd),
                "GPU time no job held",
            ),
            (
                "mean_util_sm",
                "Mean utilization",
                t.mean_util_sm,
                _pct(t.mean_util_sm),
                "time-weighted over GPUs that report utilization",
            ),
            (
                "price_missing_gpu_hours",
                "Unpriced GPU-hours",
                t.price_missing_gpu_hours,
                f"{t.price_missing_gpu_hours:,.1f}",
                "no price book entry: cost 0",
            ),
        )
    )
    generated = data.generated_at.strftime("%Y-%m-%d %H:%M UTC")
    return (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>gpuledger report: {escape(data.window.label())}</title>"
        f"<style>{CSS}</style></head><body>"
        f"<header><h1>GPU cost report</h1><p>{escape(data.window.label())} · "
        f"generated {generated} · prices from {escape(data.price_source)}</p>"
        + (f"<p class='small'>{escape(data.coverage_note)}</p>" if data.coverage_note else "")
        + "</header>"
        f"<main><div class='cards'>{cards}</div>"
        + _spend_section(data)
        + _funnel_section(data)
        + "<div class='grid2'>"
        + _projects_section(data)
        + _idle_section(data)
        + "</div>"
        + _effective_section(data)
        + _unit_section(data)
        + _recommendations_section(data)
        + _guard_section(data)
        + "<footer>gpuledger · every figure is Σ value x sign over the cost facts "
        "(docs/SQL.md) · this file needs no network</footer></main></body></html>"
    )
