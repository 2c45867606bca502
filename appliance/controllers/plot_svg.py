"""The dashboard's line plots as inline SVG, drawn on the server (issue 16).

A Gradio `LinePlot` is redrawn by a Gradio event per page every five seconds: the event, a pandas
frame, Gradio's postprocess and a Vega spec to the page cost the appliance ~13 ms of CPU per page
per refresh. Drawn here instead, once per five seconds for every open page (the controller keeps
the last drawing), the five plots cost ~1 ms together and travel in the dashboard's live stream
(ui/live.py) with the values: no Gradio event at all.

The look follows the Vega plots they replace: a title, a light grid with four or five round
ticks on the value axis, clock times along the time axis, one colour per series with a legend when
there is more than one, the newest value in each line's tooltip. Each line carries its series
name, point count and newest value as data attributes (the browser tests read them).
"""

from __future__ import annotations

import html
import math
from datetime import datetime

# Vega's default categorical scheme (tableau10), the colours the Gradio plots had.
PALETTE = ("#4c78a8", "#f58518", "#e45756", "#72b7b2", "#54a24b", "#eeca3b", "#b279a2")

WIDTH, HEIGHT = 320.0, 170.0
LEFT, RIGHT, TOP, BOTTOM = 40.0, 8.0, 8.0, 20.0  # room for the tick labels
TIME_STEPS_S = (10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200)

Points = list[tuple[float, float]]  # (unix time, value)


def nice_ticks(lo: float, hi: float, count: int = 4) -> list[float]:
    """Round tick values (1, 2 or 5 times a power of ten apart) covering [lo, hi]."""
    if not math.isfinite(lo) or not math.isfinite(hi):
        return [0.0, 1.0]
    if hi <= lo:
        hi = lo + (abs(lo) or 1.0)
    raw = (hi - lo) / count
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw)
    first = math.floor(lo / step) * step
    ticks = [first]
    while ticks[-1] < hi - step * 1e-9:
        ticks.append(first + step * len(ticks))
    return ticks


def time_ticks(t0: float, t1: float, most: int = 5) -> list[float]:
    """Clock-aligned times between t0 and t1 (every 10 s up to every 2 h), at most `most`."""
    span = max(t1 - t0, 1.0)
    step = next((s for s in TIME_STEPS_S if span / s <= most), TIME_STEPS_S[-1])
    first = math.ceil(t0 / step) * step
    return [first + i * step for i in range(int((t1 - first) // step) + 1)]


def _label(value: float, step: float) -> str:
    if step >= 1 or value == 0:
        return f"{value:,.0f}"
    decimals = min(3, max(1, -math.floor(math.log10(step))))
    return f"{value:.{decimals}f}"


def _clock(t: float, step: float) -> str:
    return datetime.fromtimestamp(t).strftime("%H:%M:%S" if step < 60 else "%H:%M")


def line_plot(key: str, title: str, series: dict[str, Points]) -> str:
    """One plot as HTML: its title, the SVG and, for several series, a legend. "" without data."""
    drawn = {name: pts for name, pts in series.items() if pts}
    if not drawn:
        return ""
    times = [t for pts in drawn.values() for t, _ in pts]
    values = [v for pts in drawn.values() for _, v in pts]
    t0, t1 = min(times), max(times)
    if t1 <= t0:
        t0 -= 1.0
    yticks = nice_ticks(min(0.0, min(values)), max(values))
    y0, y1 = yticks[0], yticks[-1]
    ystep = yticks[1] - yticks[0] if len(yticks) > 1 else 1.0
    inner_w, inner_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def x(t: float) -> float:
        return LEFT + inner_w * (t - t0) / (t1 - t0)

    def y(v: float) -> float:
        return TOP + inner_h * (1 - (v - y0) / (y1 - y0))

    parts = [
        f'<svg class="ss-plot-svg" viewBox="0 0 {WIDTH:.0f} {HEIGHT:.0f}" role="img" '
        f'aria-label="{html.escape(title)}">'
    ]
    for v in yticks:
        yy = y(v)
        parts.append(
            f'<line class="ss-grid" x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{yy:.1f}" y2="{yy:.1f}"/>'
            f'<text class="ss-tick" x="{LEFT - 4}" y="{yy + 3.5:.1f}" text-anchor="end">'
            f"{_label(v, ystep)}</text>"
        )
    tticks = time_ticks(t0, t1)
    tstep = tticks[1] - tticks[0] if len(tticks) > 1 else 60.0
    for t in tticks:
        xx = x(t)
        parts.append(
            f'<line class="ss-grid" x1="{xx:.1f}" x2="{xx:.1f}" y1="{TOP}" y2="{TOP + inner_h}"/>'
            f'<text class="ss-tick" x="{xx:.1f}" y="{HEIGHT - 6}" text-anchor="middle">'
            f"{_clock(t, tstep)}</text>"
        )
    legend = []
    for i, (name, pts) in enumerate(drawn.items()):
        color = PALETTE[i % len(PALETTE)]
        coords = " ".join(f"{x(t):.1f},{y(v):.1f}" for t, v in pts)
        last = pts[-1][1]
        tip = html.escape(f"{name}: {_label(last, ystep / 10)} at {_clock(pts[-1][0], 1)}")
        parts.append(
            f'<polyline class="ss-line" data-series="{html.escape(name)}" '
            f'data-points="{len(pts)}" data-last="{last:.6g}" stroke="{color}" '
            f'points="{coords}"><title>{tip}</title></polyline>'
        )
        legend.append(
            f'<span><span class="ss-swatch" style="background:{color}"></span>'
            f"{html.escape(name)}</span>"
        )
    parts.append("</svg>")
    legend_html = f'<div class="ss-legend">{"".join(legend)}</div>' if len(drawn) > 1 else ""
    return (
        f'<div class="ss-plot" id="ss-plot-{key}"><div class="ss-plot-title">'
        f"{html.escape(title)}</div>{''.join(parts)}{legend_html}</div>"
    )


PLOT_STYLE = """
.ss-plots { display: grid; grid-template-columns: repeat(auto-fill, minmax(300px, 1fr));
  gap: 0.8em; }
.ss-plot { border: 1px solid #e5e7eb; border-radius: 8px; padding: 0.4em 0.6em; }
.ss-plot-title { font-family: ui-sans-serif, system-ui, "DejaVu Sans", sans-serif;
  font-weight: 600; font-size: 0.95em; margin-bottom: 0.2em; }
.ss-plot-svg { width: 100%; height: auto; display: block; }
.ss-plot-svg .ss-grid { stroke: #e5e7eb; stroke-width: 1; }
.ss-plot-svg .ss-tick { fill: #6b7280; font-size: 10px;
  font-family: ui-sans-serif, system-ui, "DejaVu Sans", sans-serif; }
.ss-plot-svg .ss-line { fill: none; stroke-width: 2; stroke-linejoin: round; }
"""
