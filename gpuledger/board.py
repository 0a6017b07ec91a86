"""The live terminal board: one row per GPU, what it burns now, the top spenders so far.

Read from the store only, on event time (the latest fact's ts), so a replay shows the same
board as the live stream did.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rich.console import Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from gpuledger.output import money

LIVE_WINDOW_S = 10

GPU_SQL = """
WITH (SELECT max(ts) FROM gpuledger.cost_facts) AS latest
SELECT node, gpu_uuid, gpu_model, mig_profile, ts, job_id, team, project, job_type,
       sign, share, util_sm, usd_per_gpu_hour, allocated, idle, price_missing, sm_active
FROM gpuledger.cost_facts
WHERE ts >= latest - toIntervalSecond({window:UInt32})
  -- only each GPU's latest sample: the store picks it, not Python over every row
  AND (gpu_uuid, ts) IN (
      SELECT gpu_uuid, max(ts) FROM gpuledger.cost_facts
      WHERE ts >= latest - toIntervalSecond({window:UInt32})
      GROUP BY gpu_uuid)
ORDER BY node, gpu_uuid, ts
"""

TOP_SQL = """
SELECT {dim:Identifier} AS who, sum(cost_usd) AS usd, sum(idle_cost_usd) AS idle_usd
FROM gpuledger.cost_minute
WHERE allocated = 1
GROUP BY who ORDER BY usd DESC LIMIT 5
"""

TOTAL_SQL = """
SELECT sum(cost_usd), sum(idle_cost_usd), sum(gpu_seconds), count()
FROM gpuledger.cost_minute
"""

FIRING_SQL = "SELECT count() FROM gpuledger.alerts_firing"

# The fleet funnel over every fact: dollars total -> allocated -> active -> effective.
FUNNEL_SQL = """
SELECT sum(total_usd), sum(allocated_usd), sum(active_usd), sum(effective_usd)
FROM gpuledger.fleet_funnel(
    start = toDateTime64(0, 3, 'UTC'), end = toDateTime64(4102444800, 3, 'UTC'))
"""

# The guard's latest decisions, and what its act steps save (or would save, as dry runs).
GUARD_SQL = """
SELECT toUnixTimestamp64Milli(decided_at) / 1000, policy, target, kind, action, dry_run,
    usd_at_stake, outcome
FROM gpuledger.guard_actions
ORDER BY decided_at DESC, step DESC
LIMIT {n:UInt32}
"""

FIRING_LIST_SQL = """
SELECT kind, node, gpu_uuid, job_id, team, project, since, idle_seconds, wasted_usd, message
FROM gpuledger.alerts_firing
ORDER BY kind = 'idle_allocated_gpu' DESC, wasted_usd DESC
LIMIT {n:UInt32}
"""


@dataclass
class GpuNow:
    node: str
    gpu_uuid: str
    gpu_model: str
    mig_profile: str
    util_sm: float | None
    sm_active: float | None
    usd_per_hour: float
    jobs: list[tuple[str, str, float]]  # (job_id, team, share)
    idle_allocated: bool
    price_missing: bool


def latest_per_gpu(rows: list[tuple[Any, ...]]) -> list[GpuNow]:
    """The rows of each GPU's latest sample, with cancelled rows netted out."""
    latest: dict[str, Any] = {}
    for row in rows:
        gpu, ts = row[1], row[4]
        if gpu not in latest or ts > latest[gpu]:
            latest[gpu] = ts
    out: dict[str, GpuNow] = {}
    for row in rows:
        (node, gpu, model, mig, ts, job, team, _project, _jt, sign, share, util, rate, alloc,
         idle, missing, sm) = row  # fmt: skip
        if ts != latest[gpu]:
            continue
        now = out.setdefault(
            gpu, GpuNow(node, gpu, model, mig, util, sm, 0.0, [], False, bool(missing))
        )
        now.usd_per_hour += sign * rate * share
        if job and sign > 0:
            now.jobs.append((job, team, share))
        if alloc and idle and sign > 0:
            now.idle_allocated = True
    return sorted(out.values(), key=lambda g: (g.node, g.gpu_uuid))


def _util_style(fraction: float) -> str:
    return "green" if fraction >= 0.5 else "yellow" if fraction >= 0.05 else "red"


def _bar(fraction: float | None, width: int = 20) -> Text:
    if fraction is None:
        return Text("n/a".ljust(width + 5), style="dim")
    filled = round(fraction * width)
    return Text("█" * filled + "░" * (width - filled), style=_util_style(fraction)) + Text(
        f" {fraction * 100:3.0f}%"
    )


def _percent(fraction: float | None) -> Text:
    """GPM's SM activity; a dash where the GPU has no GPM (before Hopper)."""
    if fraction is None:
        return Text("—", style="dim")
    return Text(f"{fraction * 100:.0f}%", style=_util_style(fraction))


class Board:
    def __init__(self, client: Any, title: str = "gpuledger — live") -> None:
        self.client = client
        self.title = title
        self.note = ""

    def render(self) -> Panel:
        try:
            rows = self.client.query(GPU_SQL, parameters={"window": LIVE_WINDOW_S}).result_rows
            gpus = latest_per_gpu(rows)
            total = self.client.query(TOTAL_SQL).result_rows[0]
            teams = self.client.query(TOP_SQL, parameters={"dim": "team"}).result_rows
            projects = self.client.query(TOP_SQL, parameters={"dim": "project"}).result_rows
            firing = _firing(self.client)
            funnel = self.client.query(FUNNEL_SQL).result_rows[0]
        except Exception as exc:  # the store may still be starting: say so, keep going
            return Panel(Text(f"waiting for the store: {exc}"), title=self.title)
        if not gpus:
            return Panel(
                Text("waiting for the first cost facts (the worker holds samples ~1 s)…"),
                title=self.title,
            )
        table = Table(expand=True, header_style="bold")
        columns = ("node", "GPU", "model", "busy time", "SM active", "job", "team", "$/h now")
        for col in columns:
            table.add_column(col, justify="right" if col in ("SM active", "$/h now") else "left")
        for g in gpus:
            job = ", ".join(j for j, _, _ in g.jobs) or "—"
            team = ", ".join(sorted({t for _, t, _ in g.jobs if t})) or "—"
            model = g.gpu_model + (f" {g.mig_profile}" if g.mig_profile else "")
            rate = "no price" if g.price_missing else f"{g.usd_per_hour:,.2f}"
            style = "bold red" if g.idle_allocated else None
            flag = " IDLE" if g.idle_allocated else ""
            table.add_row(
                g.node,
                g.gpu_uuid[:12],
                model,
                _bar(g.util_sm),
                _percent(g.sm_active),
                job + flag,
                team,
                rate,
                style=style,
            )
        cost, idle_cost, gpu_seconds, _ = total
        burning = sum(g.usd_per_hour for g in gpus)
        idle_now = sum(1 for g in gpus if g.idle_allocated)
        header = Text.assemble(
            ("spent so far ", "dim"), (money(cost or 0.0), "bold"),
            ("   idle waste ", "dim"), (money(idle_cost or 0.0), "bold red"),
            ("   burning now ", "dim"), (f"{money(burning)}/h", "bold"),
            ("   GPU-hours ", "dim"), (f"{(gpu_seconds or 0) / 3600:,.3f}", "bold"),
            ("   idle allocated GPUs ", "dim"), (str(idle_now), "bold red" if idle_now else "bold"),
            ("   alerts firing ", "dim"), (str(firing), "bold red" if firing else "bold"),
        )  # fmt: skip
        total_usd, allocated_usd, active_usd, effective_usd = (v or 0.0 for v in funnel)
        funnel_line = Text.assemble(
            ("funnel ", "dim"), (money(total_usd), "bold"), (" total → ", "dim"),
            (money(allocated_usd), "bold"), (" allocated → ", "dim"),
            (money(active_usd), "bold"), (" active → ", "dim"),
            (money(effective_usd), "bold green"), (" effective (weighted by SM use)", "dim"),
        )  # fmt: skip
        tops = Table.grid(expand=True)
        tops.add_column()
        tops.add_column()
        tops.add_row(_top("Top teams by cost", teams), _top("Top projects by cost", projects))
        parts: list[Any] = [header, funnel_line, table]
        if firing:
            parts.append(_firing_table(self.client))
        guard = _guard_table(self.client)
        if guard is not None:
            parts.append(guard)
        parts.append(tops)
        if self.note:
            parts.append(Text(self.note, style="dim"))
        return Panel(Group(*parts), title=self.title)


def _top(title: str, rows: list[tuple[Any, ...]]) -> Table:
    table = Table(title=title, expand=True, show_edge=False)
    table.add_column("who")
    table.add_column("cost $", justify="right")
    table.add_column("idle $", justify="right")
    for who, usd, idle in rows:
        table.add_row(who or "(none)", f"{usd:,.4f}", f"{idle:,.4f}")
    return table


def _firing_table(client: Any, n: int = 8) -> Table:
    """The alerts firing now: idle allocated GPUs first, by dollars wasted; then orphaned
    GPU memory and budgets."""
    table = Table(title="Alerts firing", expand=True, show_edge=False, title_style="bold red")
    for col in ("alert", "GPU / scope", "job", "team", "idle", "wasted $", "what"):
        table.add_column(col, justify="right" if col in ("idle", "wasted $") else "left")
    try:
        rows = client.query(FIRING_LIST_SQL, parameters={"n": n}).result_rows
    except Exception:
        return table
    for kind, node, gpu, job, team, project, since, idle_s, wasted, message in rows:
        if kind == "idle_allocated_gpu":
            what = f"allocated, computing nothing since {since:%Y-%m-%d %H:%M} UTC"
            table.add_row(
                "IDLE", f"{node} {gpu[:12]}", job, team or "—", f"{idle_s / 60:,.0f} min",
                f"{wasted:,.2f}", what, style="red",
            )  # fmt: skip
        elif kind == "orphaned_gpu_memory":
            table.add_row(
                "ORPHAN", f"{node} {gpu[:12]}", job or "—", team or "—",
                f"{idle_s / 60:,.0f} min", f"{wasted:,.2f}", message, style="yellow",
            )  # fmt: skip
        else:
            scope = "/".join(p for p in (team, project) if p) or "fleet"
            table.add_row("BUDGET", scope, "—", team or "—", "", f"{wasted:,.2f}", message)
    return table


def _guard_table(client: Any, n: int = 5) -> Table | None:
    """The guard's latest decisions (dry runs say what they would do), or None before any."""
    try:
        rows = client.query(GUARD_SQL, parameters={"n": n}).result_rows
    except Exception:  # a store migrated before the guard's table, or away for a moment
        return None
    if not rows:
        return None
    table = Table(title="Guardrails", expand=True, show_edge=False, title_style="bold yellow")
    for col in ("policy", "job @ GPU", "step", "would save $ / saved $", "outcome"):
        table.add_column(col, justify="right" if "$" in col else "left")
    for _, policy, target, kind, action, dry_run, usd, outcome in rows:
        step = f"{kind} {action}".strip() + (" (dry run)" if dry_run and kind == "act" else "")
        table.add_row(policy, target, step, f"{usd:,.2f}", outcome)
    return table


def _firing(client: Any) -> int:
    try:
        return int(client.query(FIRING_SQL).result_rows[0][0])
    except Exception:
        return 0
