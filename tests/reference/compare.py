"""Compare a worker's answers with the reference's, view by view, row by row.

Money (Float64 columns and sums of them) must agree to 1e-9 relative. Measures made from the
Float32 columns (duration_s x share, util_sm) agree to Float32 precision, 1e-6 relative: the
reference rounds each value to Float32 as the store does, but an exact share and the
worker's float share may round to neighbouring Float32 values.
"""

from __future__ import annotations

import math
from typing import Any

MONEY_REL = 1e-9
MONEY_ABS = 1e-12  # cancel and restate leave float residue of a few 1e-17 on a zero sum
FLOAT32_REL = 1e-6
FLOAT32_ABS = 1e-9
FLOAT32_MEASURES = frozenset(
    {
        "gpu_seconds",
        "gpu_hours",
        "idle_gpu_seconds",
        "price_missing_gpu_hours",
        "mean_util_sm",
        "resource_utilization",
        "effective_cost_usd",
        "mean_sm_active",
        "sm_utilization",
        "effective_cost_sm_usd",
    }
)


def close(name: str, want: Any, got: Any) -> bool:
    if want is None or got is None:
        return want is None and got is None
    if isinstance(want, float) or isinstance(got, float):
        rel, abs_ = (
            (FLOAT32_REL, FLOAT32_ABS) if name in FLOAT32_MEASURES else (MONEY_REL, MONEY_ABS)
        )
        return math.isclose(float(want), float(got), rel_tol=rel, abs_tol=abs_)
    return bool(want == got)


def differences(
    want: dict[str, dict[Any, dict[str, Any]]], got: dict[str, dict[Any, dict[str, Any]]]
) -> list[str]:
    """Every disagreement, one line each; empty when the answers agree."""
    out: list[str] = []
    for view, want_rows in want.items():
        got_rows = got.get(view)
        if got_rows is None:
            continue  # not read on this side
        for key in sorted(set(want_rows) | set(got_rows), key=repr):
            w, g = want_rows.get(key), got_rows.get(key)
            if w is None or g is None:
                out.append(f"{view}[{key!r}]: reference {w!r}, worker {g!r}")
                continue
            for name in w:
                if name in g and not close(name, w[name], g[name]):
                    out.append(f"{view}[{key!r}].{name}: reference {w[name]!r}, worker {g[name]!r}")
    return out
