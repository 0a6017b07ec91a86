"""Inline SVG charts for the HTML report: pure functions from numbers to markup, no script,
no network, so the report opens offline and prints as it shows."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from html import escape

PALETTE = (
    "#4e79a7",
    "#f28e2b",
    "#59a14f",
    "#e15759",
    "#76b7b2",
    "#edc948",
    "#b07aa1",
    "#ff9da7",
    "#9c755f",
    "#bab0ac",
)
MUTED = "#8a8f98"
GRID = "#e3e6ea"
FONT = "font-family='system-ui, -apple-system, Segoe UI, Helvetica, Arial, sans-serif'"


def color(index: int) -> str:
    return PALETTE[index % len(PALETTE)]


def usd(value: float) -> str:
    if abs(value) >= 1000:
        return f"${value:,.0f}"
    if abs(value) >= 10:
        return f"${value:,.1f}"
    if 0 < abs(value) < 0.01:
        return f"${value:.4f}"
    return f"${value:,.2f}"


def nice_ceiling(value: float) -> float:
    """The smallest 1, 2, 2.5 or 5 x 10^n at or above `value` (an axis' top)."""
    if value <= 0:
        return 1.0
    exponent = math.floor(math.log10(value))
    for step in (1, 2, 2.5, 5, 10):
        top = step * 10**exponent
        if top >= value * (1 - 1e-12):
            return float(top)
    return float(10 ** (exponent + 1))


def _svg(width: int, height: int, body: list[str], label: str) -> str:
    return (
        f"<svg xmlns='http://www.w3.org/2000/svg' viewBox='0 0 {width} {height}' "
        f"width='100%' role='img' aria-label='{escape(label, quote=True)}' {FONT} "
        f"font-size='11'>" + "".join(body) + "</svg>"
    )


def _y_axis(
    top: float, x0: int, x1: int, y0: int, y1: int, fmt: Callable[[float], str]
) -> list[str]:
    parts = []
    for i in range(5):
        value = top * i / 4
        y = y1 - (y1 - y0) * i / 4
        parts.append(
            f"<line x1='{x0}' x2='{x1}' y1='{y:.1f}' y2='{y:.1f}' stroke='{GRID}'/>"
            f"<text x='{x0 - 6}' y='{y + 4:.1f}' text-anchor='end' fill='{MUTED}'>"
            f"{escape(fmt(value))}</text>"
        )
    return parts


def _legend(names: Sequence[str], x: int, y: int, width: int) -> list[str]:
    parts, cx, cy = [], x, y
    for i, name in enumerate(names):
        text = name if len(name) <= 24 else name[:23] + "…"
        span = 18 + 7 * len(text)
        if cx + span > x + width:
            cx, cy = x, cy + 16
        parts.append(
            f"<rect x='{cx}' y='{cy - 9}' width='10' height='10' rx='2' fill='{color(i)}'/>"
            f"<text x='{cx + 14}' y='{cy}'>{escape(text)}</text>"
        )
        cx += span + 10
    return parts


def stacked_bars(
    buckets: Sequence[str],
    series: Mapping[str, Sequence[float]],
    *,
    title: str,
    fmt: Callable[[float], str] = usd,
    width: int = 760,
    height: int = 300,
) -> str:
    """Vertical bars per bucket, one stacked segment per series."""
    if not buckets or not series:
        return empty_chart(title, width)
    names = list(series)
    totals = [sum(max(0.0, series[n][i]) for n in names) for i in range(len(buckets))]
    top = nice_ceiling(max(totals))
    legend_rows = 1 + sum(18 + 7 * min(len(n), 24) + 10 for n in names) // (width - 80)
    x0, x1, y0 = 70, width - 10, 14 + 16 * legend_rows
    y1 = height - 34
    body = _legend(names, x0, 14, x1 - x0) + _y_axis(top, x0, x1, y0, y1, fmt)
    slot = (x1 - x0) / len(buckets)
    bar = max(2.0, slot * 0.7)
    label_every = max(1, math.ceil(len(buckets) / 14))
    for i, bucket in enumerate(buckets):
        x = x0 + slot * i + (slot - bar) / 2
        base = float(y1)
        for j, name in enumerate(names):
            value = max(0.0, series[name][i])
            if value <= 0:
                continue
            h = (y1 - y0) * value / top
            base -= h
            body.append(
                f"<rect x='{x:.1f}' y='{base:.1f}' width='{bar:.1f}' height='{h:.1f}' "
                f"fill='{color(j)}'><title>{escape(f'{name}, {bucket}: {fmt(value)}')}"
                "</title></rect>"
            )
        if i % label_every == 0:
            body.append(
                f"<text x='{x + bar / 2:.1f}' y='{y1 + 16}' text-anchor='middle' "
                f"fill='{MUTED}'>{escape(bucket)}</text>"
            )
    return _svg(width, height, body, title)


def hbars(
    labels: Sequence[str],
    values: Sequence[float],
    *,
    title: str,
    fmt: Callable[[float], str] = usd,
    width: int = 760,
    bar_color: str = PALETTE[0],
) -> str:
    """Horizontal bars, one per label, with the value at the end of each bar."""
    if not labels:
        return empty_chart(title, width)
    row = 24
    x0 = 190 if width >= 700 else 130
    fits = int((x0 - 12) / 6.2)  # characters of 11 px text that fit left of the bars
    height = 10 + row * len(labels)
    top = nice_ceiling(max(max(values), 0.0))
    span = width - x0 - 90
    body = []
    for i, (label, value) in enumerate(zip(labels, values, strict=True)):
        y = 6 + row * i
        w = max(0.0, span * value / top) if top else 0.0
        text = label if len(label) <= fits else label[: fits - 1] + "…"
        body.append(
            f"<text x='{x0 - 8}' y='{y + 14}' text-anchor='end'>{escape(text)}</text>"
            f"<rect x='{x0}' y='{y + 3}' width='{w:.1f}' height='{row - 8}' rx='2' "
            f"fill='{bar_color}'><title>{escape(f'{label}: {fmt(value)}')}</title></rect>"
            f"<text x='{x0 + w + 6:.1f}' y='{y + 14}' fill='#333'>{escape(fmt(value))}</text>"
        )
    return _svg(width, height, body, title)


def lines(
    xs: Sequence[str],
    series: Mapping[str, Sequence[float | None]],
    *,
    title: str,
    fmt: Callable[[float], str] = usd,
    width: int = 760,
    height: int = 260,
) -> str:
    """One line per series over the categories `xs` (None = no point)."""
    values = [v for s in series.values() for v in s if v is not None]
    if not xs or not values:
        return empty_chart(title, width)
    names = list(series)
    top = nice_ceiling(max(values))
    x0, x1, y0, y1 = 70, width - 20, 34, height - 34
    body = _legend(names, x0, 14, x1 - x0) + _y_axis(top, x0, x1, y0, y1, fmt)
    step = (x1 - x0) / max(1, len(xs) - 1) if len(xs) > 1 else 0.0

    def x_at(i: int) -> float:
        return x0 + step * i if len(xs) > 1 else (x0 + x1) / 2

    label_every = max(1, math.ceil(len(xs) / 12))
    for i, x in enumerate(xs):
        if i % label_every == 0:
            # The first and last labels sit at the plot's edges: keep them inside it.
            anchor = "middle"
            if len(xs) > 1 and i == 0:
                anchor = "start"
            elif len(xs) > 1 and i == len(xs) - 1:
                anchor = "end"
            body.append(
                f"<text x='{x_at(i):.1f}' y='{y1 + 16}' text-anchor='{anchor}' "
                f"fill='{MUTED}'>{escape(x)}</text>"
            )
    for j, name in enumerate(names):
        points = [
            (x_at(i), y1 - (y1 - y0) * v / top) for i, v in enumerate(series[name]) if v is not None
        ]
        if len(points) > 1:
            path = " ".join(f"{px:.1f},{py:.1f}" for px, py in points)
            body.append(
                f"<polyline points='{path}' fill='none' stroke='{color(j)}' stroke-width='2'/>"
            )
        for (px, py), v in zip(points, [v for v in series[name] if v is not None], strict=True):
            body.append(
                f"<circle cx='{px:.1f}' cy='{py:.1f}' r='3.5' fill='{color(j)}'>"
                f"<title>{escape(f'{name}: {fmt(v)}')}</title></circle>"
            )
    return _svg(width, height, body, title)


def empty_chart(title: str, width: int = 760) -> str:
    return _svg(
        width,
        48,
        [f"<text x='10' y='28' fill='{MUTED}'>No data in this period.</text>"],
        title,
    )
