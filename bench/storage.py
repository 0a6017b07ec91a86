"""Storage: bytes per `cost_facts` row on disk after merges, for 10 M
rows of a realistic fleet, made by the worker's own code: 10,000 GPUs (1,250 nodes of 8)
over 1,000 s, training runs announced by the scheduler, inference known by its labels,
shared, idle and unallocated GPUs, NVML-like values (whole-percent utilization, milliwatt
power). Short runs per GPU (1,000 s each) make this a pessimistic figure: a day's partition
holds 86,400 s of each GPU, and ts and the repeated strings compress better over it.

Also: `samples_raw` (the raw samples kept 14 days for corrections) per row, and the rollups
per fact row, which a deployment stores too.
"""

from __future__ import annotations

from bench._facts import column_bytes, fill, table_bytes
from bench._fleet import Fleet
from bench._report import Figure, show
from bench._rig import Rig

SUMMARY = "bytes per cost_facts row on disk after merges, 10 M rows of a 10,000-GPU fleet"
GOAL_BYTES_PER_ROW = 8.0


def run(quick: bool = False) -> None:
    nodes, ticks, raw_ticks = (125, 200, 20) if quick else (1250, 1000, 100)
    with Rig() as rig:
        store = rig.new_store()
        filled = fill(store, Fleet(nodes), ticks, raw_ticks=raw_ticks)
        print(
            f"{filled.facts:,} facts of {filled.samples:,} samples ({filled.gpus:,} GPUs, "
            f"{filled.jobs:,} jobs, {filled.span_s:,.0f} s) made and stored in "
            f"{filled.seconds:,.0f} s ({filled.samples / filled.seconds:,.0f} samples/s "
            "through decode, cost model and FactSink in one process)",
            flush=True,
        )
        for table in ("cost_facts", "samples_raw", "cost_minute", "cost_hour"):
            store.client.command(f"OPTIMIZE TABLE gpuledger.{table} FINAL")
        facts_rows, facts_disk, facts_raw = table_bytes(store, "cost_facts")
        raw_rows, raw_disk, _ = table_bytes(store, "samples_raw")
        minute_rows, minute_disk, _ = table_bytes(store, "cost_minute")
        hour_rows, hour_disk, _ = table_bytes(store, "cost_hour")
        columns = column_bytes(store, "cost_facts")
    per_row = facts_disk / facts_rows
    figures = [
        Figure(
            "cost_facts bytes/row on disk, after OPTIMIZE FINAL",
            f"{per_row:.2f}",
            f"<= {GOAL_BYTES_PER_ROW:.0f}",
            per_row <= GOAL_BYTES_PER_ROW,
            f"{facts_raw / facts_rows:.1f} uncompressed",
            f"{facts_raw / facts_disk:.0f}x",
            f"{facts_rows:,} rows, {facts_disk / 1e6:,.1f} MB",
        ),
        Figure(
            "samples_raw bytes/sample on disk",
            f"{raw_disk / max(raw_rows, 1):.1f}",
            "",
            None,
            "",
            "",
            f"{raw_rows:,} samples (JSON payloads), kept 14 days",
        ),
        Figure(
            "cost_minute + cost_hour bytes per fact row",
            f"{(minute_disk + hour_disk) / facts_rows:.2f}",
            "",
            None,
            "",
            "",
            f"{minute_rows:,} + {hour_rows:,} rollup rows",
        ),
    ]
    top = ", ".join(f"{name} {size / facts_rows:.2f}" for name, size in columns[:6])
    show(
        f"Storage: {facts_rows:,} cost_facts rows of {filled.gpus:,} GPUs over "
        f"{filled.span_s:,.0f} s",
        figures,
        [
            f"Largest columns, bytes/row: {top}.",
            "One day of 10,000 GPUs at 1 Hz is 864 M samples (about 950 M fact rows here):",
            f"{per_row * 950e6 / 1e9:,.1f} GB of cost_facts, "
            f"{raw_disk / max(raw_rows, 1) * 864e6 / 1e9:,.1f} GB of samples_raw a day "
            "(extrapolated from these rows).",
        ],
    )
