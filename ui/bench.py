"""The Benchmark tab: run vLLM's own `vllm bench serve` against the engine, follow it, compare runs.

Layout and wiring only: what runs, what the page shows and what is exported is
`appliance.controllers.bench.BenchPanel`'s. The run goes on in the panel's own thread, so the
page only polls `view()`: every second, and only while the tab is on screen (`ui.polling`).
The runner is the service's one (`services.bench`), the same one `step-station bench` reaches,
so a run started in a terminal shows here too.
"""

from __future__ import annotations

import html
from typing import Any

import gradio as gr
import pandas as pd

from appliance.bench.runner import BenchTarget
from appliance.control import bench_target
from appliance.controllers.bench import METRICS, RUN_COLUMNS, BenchPanel, BenchView, preset_choices
from appliance.controllers.chat import export_folder
from appliance.controllers.tuning import BeforeAfter, TargetCache, pair_headers, tuned_view_for
from appliance.errors import ApplianceError
from appliance.services import Services
from appliance.settings import private_dir, write_private
from ui.model import tune_target_of
from ui.polling import panel, poll_while_visible

PANEL = "ss-bench"
POLL_S = 1.0
METRIC_LABELS = {key: label for label, key, _ in METRICS}


def build(services: Services) -> None:
    """Create the tab's widgets inside the current gr.Tab and wire them to services."""
    tune_targets = TargetCache(lambda: tune_target_of(services))
    controller = BenchPanel(
        services.bench,
        lambda: _target(services),
        lambda: tuned_view_for(services.tune.folder, *tune_targets.get()),
    )

    with panel(PANEL):
        gr.HTML(_STYLE)
        with gr.Row():
            preset = gr.Dropdown(
                choices=preset_choices(),
                value="seed",
                label="Preset",
                elem_id="ss-bench-preset",
                scale=3,
            )
            gateway = gr.Checkbox(
                value=False,
                label="Through the gateway",
                info="What a LAN client sees",
                elem_id="ss-bench-gateway",
                scale=1,
            )
        gr.Markdown("Leave a number empty to use the preset's.", elem_classes="ss-muted")
        with gr.Row():  # text boxes: a gr.Number cannot be empty, and empty is "the preset's"
            prompts = _number("Prompts", "ss-bench-prompts")
            input_len = _number("Input tokens", "ss-bench-input")
            output_len = _number("Output tokens", "ss-bench-output")
            concurrency = _number("Concurrency", "ss-bench-concurrency")
        with gr.Row():
            run = gr.Button("Run benchmark", variant="primary", elem_id="ss-bench-run")
            cancel = gr.Button(
                "Cancel", variant="stop", interactive=False, elem_id="ss-bench-cancel"
            )
        status = gr.HTML(elem_id="ss-bench-status")
        error = gr.Markdown(elem_id="ss-bench-error")
        gr.Markdown("### Past runs")
        table = gr.Dataframe(
            headers=list(RUN_COLUMNS),
            value=[],
            interactive=False,
            wrap=True,
            elem_id="ss-bench-runs",
        )
        with gr.Row():
            with gr.Column(scale=1):
                metric = gr.Dropdown(
                    choices=[(label, key) for label, key, _ in METRICS],
                    value=METRICS[0][1],
                    label="Compare",
                    elem_id="ss-bench-metric",
                )
                chosen = gr.Dropdown(
                    choices=[],
                    value=[],
                    multiselect=True,
                    label="Runs (none chosen: all)",
                    elem_id="ss-bench-chosen",
                )
                with gr.Row():
                    export_json = gr.Button("Export JSON", size="sm", elem_id="ss-bench-json")
                    export_csv = gr.Button("Export CSV", size="sm", elem_id="ss-bench-csv")
                export_file = gr.File(label="Export", visible=False, elem_id="ss-bench-file")
            with gr.Column(scale=3):
                plot = gr.BarPlot(
                    _frame([]),
                    x="label",
                    y="value",
                    title=METRICS[0][0],
                    x_title=" ",
                    y_title=" ",
                    y_lim=[0, None],  # bars from zero: Vega's own axis starts at the lowest run
                    height=260,
                    elem_id="ss-bench-plot",
                )
        gr.Markdown("### Before / after tuning")
        pair_text = gr.Markdown(elem_id="ss-bench-tuning-text")
        pair_table = gr.Dataframe(
            headers=pair_headers(BeforeAfter(None, None, "")),
            value=[],
            interactive=False,
            visible=False,
            elem_id="ss-bench-tuning",
        )
        shown = gr.State(None)  # the rows on screen, to send the table only when it changed
        pair_shown = gr.State(None)  # the pair on screen (text and rows), likewise
        timer = gr.Timer(POLL_S, active=False)

    def compare(run_ids: list[int] | None, key: str) -> Any:
        points = controller.compare(run_ids or [], key)
        return gr.BarPlot(_frame(points), title=METRIC_LABELS.get(key, key))

    def show(
        view: BenchView, seen: Any, run_ids: list[int] | None, key: str, *, clear: bool = False
    ) -> list[Any]:
        """The view as the outputs; the table, run choices and plot only when the rows moved.
        An error stays on screen until the next Run (`clear`): a refused start is told only in
        its own answer, and the next poll would otherwise wipe it a second later."""
        top = [
            _status_html(view),
            f"**{view.error}**" if view.error else ("" if clear else gr.skip()),
            gr.Button(interactive=not view.running),
            gr.Button(interactive=view.running),
        ]
        if view.rows == seen:
            return [*top, gr.skip(), gr.skip(), gr.skip(), seen]
        ids = [row[0] for row in view.rows]
        kept = [i for i in run_ids or [] if i in ids]
        return [
            *top,
            view.rows,
            gr.Dropdown(choices=[(f"#{i}", i) for i in ids], value=kept),
            compare(kept, key),
            view.rows,
        ]

    def show_pair(seen: Any) -> list[Any]:
        """The before/after section; read at each poll, since tuning changes it without a new
        run (the tuned config's install time splits the runs)."""
        pair = controller.before_after()
        if pair is None:
            return [gr.skip(), gr.skip(), seen]
        key = (pair.text, pair.rows)
        if key == seen:
            return [gr.skip(), gr.skip(), seen]
        table = gr.Dataframe(value=pair.rows, headers=pair_headers(pair), visible=bool(pair.rows))
        return [pair.text, table, key]

    def refresh(seen: Any, run_ids: list[int] | None, key: str, seen_pair: Any) -> list[Any]:
        return [*show(controller.view(), seen, run_ids, key), *show_pair(seen_pair)]

    def on_run(
        name: str,
        num: Any,
        inp: Any,
        out: Any,
        conc: Any,
        via_gateway: bool,
        seen: Any,
        run_ids: list[int] | None,
        key: str,
    ) -> list[Any]:
        view = controller.start(name, num, inp, out, conc, via_gateway)
        return show(view, seen, run_ids, key, clear=True)

    def on_cancel(seen: Any, run_ids: list[int] | None, key: str) -> list[Any]:
        return show(controller.cancel(), seen, run_ids, key)

    def on_export(fmt: str, run_ids: list[int] | None) -> Any:
        try:
            name, text = controller.export(fmt, run_ids or [])
        except ApplianceError as err:
            raise gr.Error(str(err)) from err
        path = write_private(private_dir(export_folder()) / name, text)
        return gr.File(value=str(path), visible=True)

    state = [shown, chosen, metric]
    outputs = [status, error, run, cancel, table, chosen, plot, shown]
    polled = [*state, pair_shown]
    polled_out = [*outputs, pair_text, pair_table, pair_shown]
    timer.tick(refresh, polled, polled_out, show_progress="hidden", concurrency_limit=None)
    poll_while_visible(PANEL, [timer], refresh, polled, polled_out)
    run.click(
        on_run,
        [preset, prompts, input_len, output_len, concurrency, gateway, *state],
        outputs,
        show_progress="hidden",
        concurrency_limit=1,
        concurrency_id="ss-bench-run",
    )
    cancel.click(on_cancel, state, outputs, show_progress="hidden")
    for changed in (metric, chosen):
        changed.input(compare, [chosen, metric], [plot], show_progress="hidden")
    export_json.click(lambda ids: on_export("json", ids), [chosen], [export_file])
    export_csv.click(lambda ids: on_export("csv", ids), [chosen], [export_file])


def _target(services: Services) -> BenchTarget:
    """The engine as a run starting now sees it: the settings in force, and the engine's GPU as
    the sampler last saw it ("" on a CPU engine), as the service gives `step-station bench`
    (appliance/server.py `_engine_gpu_name`)."""
    sample = services.sampler.latest()
    gpu = sample.engine_gpu() if sample is not None else None
    return bench_target(services.supervisor, services.settings, gpu.name if gpu else "")


def _number(label: str, elem_id: str) -> gr.Textbox:
    return gr.Textbox(label=label, placeholder="the preset's", max_lines=1, elem_id=elem_id)


def _frame(points: list[dict[str, Any]]) -> pd.DataFrame:
    """The plot's data; typed columns even when empty (an empty float `label` column makes the
    plot's x axis numeric, and then no bar ever shows)."""
    labels = pd.Series([str(p["label"]) for p in points], dtype=str)
    values = pd.Series([float(p["value"]) for p in points], dtype=float)
    return pd.DataFrame({"label": labels, "value": values})


def _status_html(view: BenchView) -> str:
    """The one status line, and a bar of requests done / total while a run goes on."""
    bar = ""
    if view.fraction is not None:
        width = f"{100 * min(max(view.fraction, 0.0), 1.0):.1f}%"
        bar = f'<div class="ss-bar"><div class="ss-bar-fill" style="width: {width}"></div></div>'
    state = "running" if view.running else "idle"
    line = html.escape(view.status)
    return f'<div class="ss-bench-line" data-state="{state}">{line}</div>{bar}'


_STYLE = """<style>
.ss-bench-line { font-family: ui-sans-serif, system-ui, "DejaVu Sans", sans-serif;
  font-weight: 600; margin: 0.3em 0; }
#ss-bench-status .ss-bar { height: 8px; background: #e5e7eb; border-radius: 4px; overflow: hidden; }
#ss-bench-status .ss-bar-fill { height: 100%; background: #6366f1; }
#ss-bench-error p { color: #dc2626; }
</style>"""
