"""The dashboard tab's logic: cards, the memory breakdown and the plots' frames from samples.

Every number comes from the shared sampler's ring buffer, so an open page costs a read, never an
NVML query. While the tab is on screen its live stream (ui/live.py) asks `values()` and
`plots_html()` at each new sample: the values are made once per sample and the plots (server-drawn
SVG, plot_svg.py) once per PLOT_EVERY_S, whoever asks. `plots()` (pandas frames for Gradio's
LinePlot) serves only the old per-page timer wiring (STEP_STATION_LIVE=poll).
While a benchmark or an MoE tuning runs, `activity()` says so above the cards: the GPU numbers
then include its load (issue 14: the run is marked in the dashboard).
"""

from __future__ import annotations

import html
import math
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

import pandas as pd

from appliance.bench.runner import BenchState
from appliance.bench.tuning import TuneState
from appliance.controllers import plot_svg
from appliance.controllers.fleet import engine_queue, kv_text
from appliance.fleet.router import FleetView
from appliance.monitoring.sampler import GpuSample, Sample
from appliance.monitoring.timeline import WHY_RESERVED, MemoryBreakdown, memory_breakdown
from appliance.units import NA, fmt_bytes, fmt_num

READER = "dashboard"  # the sampler counts reads per reader


class SampleSource(Protocol):
    """The part of the sampler the dashboard reads."""

    def latest(self, reader: str = "") -> Sample | None: ...

    def history(self, seconds: float | None = None, reader: str = "") -> list[Sample]: ...


class BenchWatch(Protocol):
    """The part of the service's BenchRunner the dashboard reads (a small progress record)."""

    def current(self) -> BenchState | None: ...


class TuneWatch(Protocol):
    """The part of the service's TuneRunner the dashboard reads."""

    def current(self) -> TuneState | None: ...


_PART_COLORS = {
    "Weights": "#6366f1",
    "KV cache in use": "#f59e0b",
    "KV cache reserved, free": "#fde68a",
    "Engine: activations, CUDA graphs, context": "#a5b4fc",
    "Engine": "#818cf8",
    "Other processes": "#f87171",
    "Driver and unlisted": "#9ca3af",
    "Free": "#e5e7eb",
}


# ------------------------------------------------------------------------------------ current


def _pct_bar(used: int | None, total: int | None) -> str:
    if used is None or not total:
        return ""
    pct = max(0.0, min(100.0, 100.0 * used / total))
    return f'<div class="ss-bar"><div class="ss-bar-fill" style="width:{pct:.1f}%"></div></div>'


def gpu_card(gpu: GpuSample) -> str:
    rows = [
        ("Memory", f"{fmt_bytes(gpu.memory_used_bytes)} of {fmt_bytes(gpu.memory_total_bytes)}"),
        ("Utilization", fmt_num(gpu.utilization_pct, " %")),
        ("Temperature", fmt_num(gpu.temperature_c, " °C")),
        ("Power", f"{fmt_num(gpu.power_w, ' W')} of {fmt_num(gpu.power_limit_w, ' W')}"),
        ("SM clock", fmt_num(gpu.sm_clock_mhz, " MHz")),
        (
            "Throttle reasons",
            NA if gpu.throttle_reasons is None else (", ".join(gpu.throttle_reasons) or "none"),
        ),
    ]
    cells = "".join(
        f'<tr><th>{k}</th><td data-field="{k.lower().replace(" ", "-")}">{html.escape(v)}</td></tr>'
        for k, v in rows
    )
    procs = "".join(
        f'<tr class="{"ss-engine" if p.is_engine else ""}" data-pid="{p.pid}"><td>{p.pid}</td>'
        f"<td>{html.escape(p.name or 'not visible to this host')}</td>"
        f"<td>{fmt_bytes(p.memory_bytes)}</td></tr>"
        for p in gpu.processes
    )
    proc_table = (
        f'<table class="ss-procs"><tr><th>PID</th><th>Process</th><th>GPU memory</th></tr>'
        f"{procs}</table>"
        if procs
        else '<p class="ss-muted">No processes on this GPU.</p>'
    )
    return (
        f'<div class="ss-card" data-gpu="{gpu.index}"><div class="ss-title">GPU {gpu.index}: '
        f"{html.escape(gpu.name)}</div>{_pct_bar(gpu.memory_used_bytes, gpu.memory_total_bytes)}"
        f'<table class="ss-kv">{cells}</table>{proc_table}</div>'
    )


def host_card(sample: Sample) -> str:
    h = sample.host
    memory = f"{fmt_bytes(h.memory_used_bytes)} of {fmt_bytes(h.memory_total_bytes)}"
    note = ""
    if h.memory_source == "grace-numa":
        note = (
            '<p class="ss-muted">Grace memory only: the OS also counts '
            f"{fmt_bytes(h.gpu_numa_bytes)} of GPU memory as system RAM; that is shown per GPU, "
            "never added here.</p>"
        )
    return (
        '<div class="ss-card" data-card="host"><div class="ss-title">Host</div>'
        f"{_pct_bar(h.memory_used_bytes, h.memory_total_bytes)}"
        f'<table class="ss-kv"><tr><th>CPU</th><td data-field="cpu">{fmt_num(h.cpu_pct, " %")}'
        f'</td></tr><tr><th>Memory</th><td data-field="host-memory">{memory}</td></tr>'
        f'<tr><th>Free disk for weights</th><td data-field="disk">'
        f"{fmt_bytes(h.weights_disk_free_bytes)}</td></tr></table>{note}"
        f'<p class="ss-muted">Weights folder: {html.escape(h.weights_dir)}</p></div>'
    )


def engine_card(sample: Sample) -> str:
    e = sample.engine
    if e is None:
        state = sample.engine_state or "not started"
        return (
            '<div class="ss-card" data-card="engine"><div class="ss-title">Engine</div>'
            f'<p class="ss-muted">Engine numbers appear while it serves (now: '
            f"{html.escape(state.replace('_', ' '))}).</p></div>"
        )
    ttft = e.ttft_median_s * 1000 if e.ttft_median_s is not None else None
    rows = [
        ("Requests running", fmt_num(e.running)),
        ("Requests waiting", fmt_num(e.waiting)),
        ("KV-cache usage", fmt_num(e.kv_cache_usage_pct, " %", 1)),
        ("Generation", fmt_num(e.generation_tokens_per_s, " tokens/s", 1)),
        ("Prompt", fmt_num(e.prompt_tokens_per_s, " tokens/s", 1)),
        ("Prefix-cache hit rate", fmt_num(e.prefix_cache_hit_pct, " %", 1)),
        ("MTP acceptance", fmt_num(e.spec_acceptance_pct, " %", 1)),
        ("Time to first token (median)", fmt_num(ttft, " ms")),
        ("Sleep state", (e.sleep_state or NA).replace("_", " ")),
    ]
    cells = "".join(
        f'<tr><th>{k}</th><td data-field="{k.lower().split(" (")[0].replace(" ", "-")}">'
        f"{html.escape(v)}</td></tr>"
        for k, v in rows
    )
    return (
        '<div class="ss-card" data-card="engine"><div class="ss-title">Engine</div>'
        f'<table class="ss-kv">{cells}</table>'
        '<p class="ss-muted">Hit rate, acceptance and TTFT are since the engine started.</p></div>'
    )


def current_html(sample: Sample | None) -> str:
    if sample is None:
        return '<p class="ss-muted">Waiting for the first reading…</p>'
    cards = [gpu_card(g) for g in sample.gpus]
    if not sample.gpus:
        cards.append(
            '<div class="ss-card" data-card="no-gpu"><div class="ss-title">GPU</div>'
            "<p>No GPU readings: "
            f"{html.escape(sample.gpu_error or 'no NVIDIA GPU found')}.</p></div>"
        )
    cards += [host_card(sample), engine_card(sample)]
    stamp = datetime.fromtimestamp(sample.at).strftime("%H:%M:%S")
    return (
        f'<div class="ss-cards">{"".join(cards)}</div>'
        f'<p class="ss-muted" id="ss-sampled-at" data-at="{sample.at:.3f}">Sampled at {stamp}</p>'
    )


def breakdown_html(breakdown: MemoryBreakdown | None) -> str:
    if breakdown is None:
        return '<p class="ss-muted">No GPU memory reading to break down.</p>'
    total = breakdown.total_bytes or 1
    segments = "".join(
        f'<div class="ss-seg" title="{html.escape(p.name)}: {fmt_bytes(p.bytes)}" '
        f'style="width:{100 * p.bytes / total:.2f}%;background:{_PART_COLORS.get(p.name, "#ccc")}">'
        "</div>"
        for p in breakdown.parts
        if p.bytes > 0
    )
    legend = "".join(
        f'<span class="ss-part" data-part="{html.escape(p.name)}"><span class="ss-swatch" '
        f'style="background:{_PART_COLORS.get(p.name, "#ccc")}"></span>{html.escape(p.name)}: '
        f'<span class="ss-strong">{fmt_bytes(p.bytes)}</span></span>'
        for p in breakdown.parts
    )
    note = f'<p class="ss-muted">{html.escape(breakdown.note)}</p>' if breakdown.note else ""
    return (
        '<div class="ss-breakdown"><div class="ss-title">'
        f"Memory of {html.escape(breakdown.gpu_name)} "
        f"({fmt_bytes(breakdown.total_bytes)})</div>"
        f'<div class="ss-stack">{segments}</div><div class="ss-legend">{legend}</div>{note}'
        f'<p class="ss-why">{html.escape(WHY_RESERVED)}</p></div>'
    )


def activity_html(bench: BenchState | None, tuning: TuneState | None) -> str:
    """One line per run that loads the GPU now ("" when none): what it is, how far, and what it
    means for the numbers below."""
    lines = []
    if bench is not None:
        via = " through the gateway" if bench.through_gateway else ""
        done = f"{bench.done}/{bench.total} requests" if bench.total else "starting"
        if bench.cancelling:
            done = "cancelling"
        lines.append(
            f'<div class="ss-activity-line" data-run="bench">Benchmark running{via}: '
            f"{done} ({html.escape(bench.preset)}) — GPU and engine numbers include its load."
            "</div>"
        )
    if tuning is not None:
        done = "cancelling" if tuning.cancelling else f"{tuning.done}/{tuning.total} batch sizes"
        lines.append(
            '<div class="ss-activity-line" data-run="tune">MoE tuning running: '
            f"{done} — the engine is stopped; the GPU numbers are the tuner's.</div>"
        )
    if not lines:
        return ""
    return f'<div class="ss-activity">{"".join(lines)}</div>'


# -------------------------------------------------------------------------------------- plots


# The plots are redrawn every 5 s: a point per 5 s is all a 15-minute plot a few hundred pixels
# wide can show. Averaging the 1 s samples into at most this many points makes each redraw about
# five times cheaper once the history is full.
PLOT_POINTS = 180
PLOT_EVERY_S = 5.0  # how often the plots are redrawn while a page watches


def plot_points(
    samples: list[Sample], max_points: int = PLOT_POINTS
) -> dict[str, dict[str, list[tuple[float, float]]]]:
    """Per plot, per series, (time, value) points: consecutive samples averaged into at most
    `max_points` points per series (each at its last sample's time)."""
    points: dict[str, dict[str, list[tuple[float, float]]]] = {k: {} for k, _ in PLOTS}
    size = max(1, -(-len(samples) // max(1, max_points)))  # ceil
    for start in range(0, len(samples), size):
        chunk = samples[start : start + size]
        values: dict[tuple[str, str], list[float]] = {}
        for s in chunk:
            for g in s.gpus:
                label = f"GPU {g.index}"
                used = g.memory_used_bytes
                _add(values, "memory", label, None if used is None else used / 1024**3)
                _add(values, "utilization", label, g.utilization_pct)
                _add(values, "power", label, g.power_w)
            e = s.engine
            if e is not None:
                _add(values, "tokens", "generation", e.generation_tokens_per_s)
                _add(values, "tokens", "prompt", e.prompt_tokens_per_s)
                _add(values, "kv", "KV cache", e.kv_cache_usage_pct)
        t = chunk[-1].at
        for (plot, series), got in values.items():
            points[plot].setdefault(series, []).append((t, sum(got) / len(got)))
    return points


def plot_frames(samples: list[Sample], max_points: int = PLOT_POINTS) -> dict[str, pd.DataFrame]:
    """The same points as long-format frames (time, value, series) for Gradio's LinePlot (the
    old wiring, STEP_STATION_LIVE=poll)."""
    return {
        plot: pd.DataFrame(
            [(datetime.fromtimestamp(t), v, name) for name, pts in series.items() for t, v in pts],
            columns=["time", "value", "series"],
        )
        for plot, series in plot_points(samples, max_points).items()
    }


def plots_html(samples: list[Sample]) -> str:
    """The five plots as server-drawn SVG (plot_svg.py); a plot without data is left out."""
    points = plot_points(samples)
    drawn = "".join(plot_svg.line_plot(key, title, points[key]) for key, title in PLOTS)
    if not drawn:
        return '<p class="ss-muted">The plots appear with the first readings.</p>'
    return f'<div class="ss-plots">{drawn}</div>'


def _add(
    values: dict[tuple[str, str], list[float]], plot: str, series: str, value: float | None
) -> None:
    if value is not None and math.isfinite(value):  # a NaN or inf reading is no point
        values.setdefault((plot, series), []).append(value)


def fleet_html(view: FleetView) -> str:
    """A card of the fleet: the router's state and one row per member (docs/fleet.md)."""
    head = f"vllm-router {view.router}" + (f" ({view.policy})" if view.policy else "")
    head += f": {view.healthy_text()}"
    rows = "".join(
        f'<tr data-member="{html.escape(m.name)}" data-state="{html.escape(m.state)}">'
        f"<td>{html.escape(m.name)}</td><td>{html.escape(m.state)}</td><td>{m.load}</td>"
        f"<td>{engine_queue(m)}</td><td>{kv_text(m)}</td></tr>"
        for m in view.members
    )
    message = f'<div class="ss-muted">{html.escape(view.message)}</div>' if view.message else ""
    return (
        '<div class="ss-card" data-card="fleet"><div class="ss-title">Fleet</div>'
        f'<div class="ss-muted">{html.escape(head)}</div>{message}'
        '<table class="ss-procs"><tr><th>Member</th><th>State</th><th>In flight</th>'
        f"<th>Running / waiting</th><th>KV cache</th></tr>{rows}</table></div>"
    )


PLOTS = (
    ("memory", "GPU memory used (GiB)"),
    ("utilization", "GPU utilization (%)"),
    ("power", "GPU power (W)"),
    ("tokens", "Tokens per second"),
    ("kv", "KV-cache usage (%)"),
)


@dataclass(frozen=True)
class Values:
    """The current readings as HTML, and the sample time they show."""

    current: str
    breakdown: str
    at: float


@dataclass(frozen=True)
class Plot:
    """One plot's frame; a plot with no data (no GPU here, engine not serving yet) is hidden."""

    key: str
    frame: pd.DataFrame

    @property
    def visible(self) -> bool:
        return not self.frame.empty


class DashboardController:
    """What the dashboard shows, read from the sampler and the engine's effective settings."""

    def __init__(
        self,
        sampler: SampleSource,
        effective: Callable[[], dict[str, Any]],
        bench: BenchWatch | None = None,
        tuning: TuneWatch | None = None,
        history_s: float | None = None,
        fleet: Callable[[], FleetView] | None = None,
    ) -> None:
        self.sampler = sampler
        self.effective = effective  # the engine's effective settings (weights and KV sizes)
        self.bench = bench
        self.tuning = tuning
        self.fleet = fleet  # the fleet's view (appliance/fleet), when this Station fronts one
        # The plots' span: the buffer holds more while nobody watches (the sampler then samples
        # every 10 s into a buffer sized for 1 s samples), so the plots cut it to this.
        self.history_s = history_s
        # What the last call made, for the next page asking about the same sample: every open
        # dashboard's stream asks once per sample, the plots are redrawn once per PLOT_EVERY_S.
        self._values: tuple[float, dict[str, Any], Values] | None = None
        self._plots: tuple[tuple[float, int], list[Plot]] | None = None
        self._plots_html: tuple[float, str] | None = None  # (newest sample time drawn, HTML)

    def activity(self) -> str:
        """The runs loading the GPU now, as HTML ("" when none)."""
        bench = self.bench.current() if self.bench is not None else None
        tuning = self.tuning.current() if self.tuning is not None else None
        return activity_html(bench, tuning)

    def fleet_html(self) -> str:
        """The members this Station's router serves, their state, load and KV cache ("" when
        there is no fleet)."""
        view = self.fleet() if self.fleet is not None else None
        return fleet_html(view) if view is not None and view.router != "off" else ""

    def values(self, seen_at: float) -> Values | None:
        """The cards and breakdown; None when the newest sample is the one the page shows."""
        sample = self.sampler.latest(reader=READER)
        if sample is None or sample.at == seen_at:
            return None
        effective = self.effective()
        made = self._values
        if made is not None and made[0] == sample.at and made[1] == effective:
            return made[2]
        kv = sample.engine.kv_cache_usage_pct if sample.engine else None
        parts = memory_breakdown(sample, effective, kv)
        values = Values(current_html(sample), breakdown_html(parts), sample.at)
        self._values = (sample.at, effective, values)
        return values

    def plots(self) -> list[Plot]:
        samples = self.sampler.history(self.history_s, reader=READER)
        stamp = (samples[-1].at if samples else 0.0, len(samples))
        made = self._plots
        if made is not None and made[0] == stamp:
            return made[1]
        frames = plot_frames(samples)
        plots = [Plot(key, frames[key]) for key, _ in PLOTS]
        self._plots = (stamp, plots)
        return plots

    def plots_html(self) -> tuple[float, str] | None:
        """The plots as HTML and the newest sample time they draw, redrawn at most every
        PLOT_EVERY_S of sample time whoever asks (every open page's stream asks at each sample);
        None before the first sample."""
        latest = self.sampler.latest()
        if latest is None:
            return None
        made = self._plots_html
        if made is not None and 0 <= latest.at - made[0] < PLOT_EVERY_S:
            return made
        samples = self.sampler.history(self.history_s, reader=READER)
        drawn = (samples[-1].at if samples else latest.at, plots_html(samples))
        self._plots_html = drawn
        return drawn
