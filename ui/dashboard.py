"""The dashboard tab: current GPU, host and engine numbers, 15-minute plots, memory breakdown.

Layout and wiring only: what to show is `appliance.controllers.dashboard.DashboardController`'s.
While the tab is on screen (`ui.polling`) one stream per page (ui/live.py) pushes the current
values when the sampler has a new sample (every second while any page watches) and the plots,
drawn on the server as SVG once for all pages, every five seconds; a hidden tab has no stream and
the tab has no Gradio event at all. A running benchmark or MoE tuning is marked above the cards,
read at each of those samples from the service's runners. `STEP_STATION_LIVE=poll` selects the
old wiring (a 1 s and a 5 s `gr.Timer` per page, Gradio LinePlots; benchmarks/sampler_cost.py
compares the two).
"""

from __future__ import annotations

import os
from typing import Any

import gradio as gr
import pandas as pd

from appliance.controllers import plot_svg
from appliance.controllers.dashboard import PLOT_EVERY_S, PLOTS, DashboardController
from appliance.services import Services
from ui import live
from ui.polling import live_while_visible, panel, poll_while_visible

PANEL = "ss-dashboard"


LIVE_TARGETS = {
    "activity": "ss-activity-live",
    "current": "ss-current-live",
    "breakdown": "ss-breakdown-live",
    "fleet": "ss-fleet-live",
    "plots": "ss-plots-live",
}
_LIVE_SLOT = '<div id="%s"></div>'


def controller_for(services: Services) -> DashboardController:
    """The dashboard's controller (the tab's plots and ui/live.py's stream each make one)."""
    supervisor = services.supervisor
    return DashboardController(
        services.sampler,
        lambda: supervisor.status().effective,
        services.bench,
        services.tune,
        history_s=services.sampler.settings.sampler.history_s,
        fleet=services.gateway.fleet.view,
    )


def push_mode() -> bool:
    """Push (one stream per visible page, the default) or the old per-page timers ("poll")."""
    return os.environ.get("STEP_STATION_LIVE", "push").strip().lower() != "poll"


def build(services: Services) -> None:
    """Create the tab's widgets inside the current gr.Tab and wire them to services."""
    sampler = services.sampler
    controller = controller_for(services)

    with panel(PANEL):
        gr.HTML(_STYLE)
        push = push_mode()  # the live values are written into these by the page's script
        activity = gr.HTML(
            _LIVE_SLOT % LIVE_TARGETS["activity"] if push else "", elem_id="ss-activity"
        )
        current = gr.HTML(
            _LIVE_SLOT % LIVE_TARGETS["current"] if push else "", elem_id="ss-current"
        )
        breakdown = gr.HTML(
            _LIVE_SLOT % LIVE_TARGETS["breakdown"] if push else "", elem_id="ss-breakdown"
        )
        if push:  # the fleet's members, when this Station fronts a fleet (pushed only)
            gr.HTML(_LIVE_SLOT % LIVE_TARGETS["fleet"], elem_id="ss-dashboard-fleet")
        gr.Markdown(f"### Last {sampler.settings.sampler.history_s // 60} minutes")
        plots: list[gr.LinePlot] = []
        if push:  # server-drawn SVG plots, pushed every 5 s with the values
            gr.HTML(_LIVE_SLOT % LIVE_TARGETS["plots"], elem_id="ss-plots")
        else:
            with gr.Row():
                for key, title in PLOTS[:3]:
                    plots.append(_plot(key, title))
            with gr.Row():
                for key, title in PLOTS[3:]:
                    plots.append(_plot(key, title))

    if push:  # everything through ui/live.py's stream while the tab is on screen
        live_while_visible(PANEL, live.DASHBOARD_PATH, LIVE_TARGETS)
        return
    # The old wiring, per page: a 1 s and a 5 s timer (benchmarks/sampler_cost.py compares).
    seen = gr.State(0.0)
    seen_activity = gr.State("")
    values_timer = gr.Timer(sampler.interval_s, active=False)
    plots_timer = gr.Timer(PLOT_EVERY_S, active=False)

    def refresh_values(seen_at: float, seen_line: str | None) -> Any:
        line = controller.activity()
        marked = [gr.skip(), seen_line] if line == seen_line else [line, line]
        values = controller.values(seen_at)
        if values is None:
            return gr.skip(), gr.skip(), seen_at, *marked
        return values.current, values.breakdown, values.at, *marked

    def refresh_plots() -> Any:
        return [gr.LinePlot(value=p.frame, visible=p.visible) for p in controller.plots()]

    def refresh_all(seen_at: float, seen_line: str | None) -> Any:
        return [*refresh_values(0.0, None), *refresh_plots()]

    value_inputs = [seen, seen_activity]
    value_outputs = [current, breakdown, seen, activity, seen_activity]
    values_timer.tick(
        refresh_values, value_inputs, value_outputs, show_progress="hidden", concurrency_limit=None
    )
    plots_timer.tick(refresh_plots, None, plots, show_progress="hidden", concurrency_limit=None)
    poll_while_visible(
        PANEL, [values_timer, plots_timer], refresh_all, value_inputs, [*value_outputs, *plots]
    )


def _plot(key: str, title: str) -> gr.LinePlot:
    return gr.LinePlot(
        pd.DataFrame({"time": pd.Series(dtype="datetime64[ns]"), "value": [], "series": []}),
        x="time",
        y="value",
        color="series",
        title=title,
        x_title=" ",
        y_title=" ",
        height=220,
        visible=False,
        elem_id=f"ss-plot-{key}",
    )


_STYLE = (
    """<style>"""
    + plot_svg.PLOT_STYLE
    + """
.ss-cards { display: flex; flex-wrap: wrap; gap: 0.8em; }
.ss-card { border: 1px solid #e5e7eb; border-radius: 8px; padding: 0.5em 0.8em; min-width: 18em;
  flex: 1; }
/* Gradio's bundled Source Sans Pro renders some bold capitals as small caps ("GB" -> "Gʙ"):
   bold text in these panels uses the system sans-serif. */
.ss-title, .ss-strong, .ss-procs tr.ss-engine td, .ss-procs th {
  font-family: ui-sans-serif, system-ui, "DejaVu Sans", sans-serif; }
.ss-title { font-weight: 600; font-size: 1.1em; margin: 0.2em 0 0.4em; }
.ss-strong { font-weight: 600; }
.ss-kv th { text-align: left; font-weight: normal; padding-right: 1em; color: #6b7280; }
.ss-procs { font-size: 0.85em; margin-top: 0.4em; }
.ss-procs tr.ss-engine td { font-weight: 600; }
.ss-bar { height: 8px; background: #e5e7eb; border-radius: 4px; overflow: hidden; }
.ss-bar-fill { height: 100%; background: #6366f1; }
.ss-stack { display: flex; height: 22px; border-radius: 4px; overflow: hidden;
  border: 1px solid #d1d5db; }
.ss-legend { display: flex; flex-wrap: wrap; gap: 0.3em 1.2em; margin: 0.4em 0; }
.ss-swatch { display: inline-block; width: 0.9em; height: 0.9em; margin-right: 0.3em;
  border-radius: 2px; vertical-align: middle; }
.ss-muted { color: #6b7280; font-size: 0.85em; }
.ss-activity { border: 1px solid #f59e0b; background: #fffbeb; border-radius: 6px;
  padding: 0.4em 0.8em; font-family: ui-sans-serif, system-ui, "DejaVu Sans", sans-serif; }
</style>"""
)
