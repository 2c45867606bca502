"""The model tab: pick a profile, start and stop the engine, watch the start-up timeline, tune
the MoE kernels.

Layout and wiring only: what to show and what the button does is
`appliance.controllers.model.ModelController`'s, the tuning section
`appliance.controllers.tuning.TunePanel`'s; this module maps their plain data to widgets and
their errors to `gr.Error`.
"""

from __future__ import annotations

import html
from typing import Any

import gradio as gr

from appliance.bench.tuning import TuneTarget
from appliance.control import tune_target
from appliance.controllers.model import (
    START,
    Button,
    EngineView,
    ModelController,
    Switch,
    profile_choices,
    profile_label,
    unfit_markdown,
)
from appliance.controllers.model import switches as model_switches
from appliance.controllers.model import timeline_html as timeline_html  # tests render through here
from appliance.controllers.tuning import TunePanel, TuneView
from appliance.errors import ApplianceError
from appliance.services import Services
from ui.polling import panel, poll_while_visible

PANEL = "ss-model"


def _button(button: Button) -> Any:
    return gr.Button(value=button.label, variant=button.variant, interactive=button.interactive)


def _checkbox(switch: Switch) -> Any:
    if switch.value is None:  # no profile picked: leave the box's value as it is
        return gr.Checkbox(interactive=switch.interactive)
    return gr.Checkbox(value=switch.value, interactive=switch.interactive, info=switch.info)


def switches(name: str | None, mtp: bool, sleep: bool) -> tuple[Any, Any]:
    """MTP and sleep-mode checkboxes for a profile: offered only where the profile allows."""
    mtp_box, sleep_box = model_switches(name, mtp, sleep)
    return _checkbox(mtp_box), _checkbox(sleep_box)


def _panel(view: EngineView | None) -> list[Any]:
    """The controller's view as the six outputs; gr.skip() for what did not change."""
    if view is None:
        return [gr.skip()] * 6

    def kept(value: str | None) -> Any:
        return gr.skip() if value is None else value

    return [
        _button(view.button),
        view.timeline,
        kept(view.failure),
        kept(view.effective),
        kept(view.log),
        view.version,
    ]


def tune_target_of(services: Services) -> TuneTarget:
    """The engine as vLLM's MoE tuner sees it, as the service gives `step-station tune-moe`
    (appliance/control.py `_post_tune`), with the engine's GPU as the sampler last saw it."""
    sample = services.sampler.latest()
    gpu = sample.engine_gpu() if sample is not None else None
    return tune_target(services.supervisor, services.settings, gpu.name if gpu else "")


def tune_panel(services: Services) -> TunePanel:
    """The Tune button's logic over the service's one TuneRunner; the engine is stopped the way
    the service stops it for `step-station tune-moe`."""
    supervisor = services.supervisor
    return TunePanel(
        services.tune,
        lambda: tune_target_of(services),
        lambda message: supervisor.stop(),
        bench_idle=services.bench.ensure_idle,
    )


def _tune_outputs(view: TuneView, seen: TuneView | None, *, clear: bool = False) -> list[Any]:
    """The tuning view as its outputs; nothing sent when the page shows it already. An error
    stays until the next start (`clear`), as the Benchmark tab's does."""
    error = f"**{html.escape(view.error)}**" if view.error else ("" if clear else gr.skip())
    if view == seen:
        return [gr.skip()] * 5 + [error, seen]
    return [
        view.line,
        gr.Button(interactive=view.can_tune),
        gr.Button(interactive=view.running),
        view.why_not,
        _progress_html(view),
        error,
        view,
    ]


def _progress_html(view: TuneView) -> str:
    if not view.progress:
        return ""
    bar = ""
    if view.fraction is not None:
        width = f"{100 * min(max(view.fraction, 0.0), 1.0):.1f}%"
        bar = f'<div class="ss-bar"><div class="ss-bar-fill" style="width: {width}"></div></div>'
    state = "running" if view.running else "idle"
    line = html.escape(view.progress)
    return f'<div class="ss-tune-line" data-state="{state}">{line}</div>{bar}'


def build(services: Services) -> None:
    """Create the tab's widgets inside the current gr.Tab and wire them to services."""
    controller = ModelController(services.supervisor, services.store, services.progress_rates)
    tuning = tune_panel(services)
    choices = profile_choices(services.settings, demo=services.demo)

    with panel(PANEL):
        gr.HTML(_STYLE)
        with gr.Row():
            profile = gr.Dropdown(
                choices=[(profile_label(n), n) for n in choices.offered],
                value=choices.default,
                label="Launch profile",
                elem_id="ss-profile",
                scale=3,
            )
            mtp = gr.Checkbox(
                value=services.settings.engine.mtp, label="MTP", elem_id="ss-mtp", scale=1
            )
            sleep = gr.Checkbox(
                value=services.settings.engine.sleep_mode,
                label="Sleep mode",
                elem_id="ss-sleep",
                scale=1,
            )
        gr.Markdown(unfit_markdown(choices), elem_id="ss-unfit")
        button = gr.Button(START, variant="primary", elem_id="ss-engine-button")
        timeline = gr.HTML(elem_id="ss-timeline")
        failure = gr.HTML(elem_id="ss-failure")
        with gr.Row():
            with gr.Column(scale=1):
                gr.Markdown("### Effective settings")
                effective = gr.Markdown(elem_id="ss-effective")
            with gr.Column(scale=2):
                logs = gr.Textbox(
                    label="Engine log (live)",
                    lines=16,
                    max_lines=16,
                    autoscroll=True,
                    interactive=False,
                    elem_id="ss-log",
                )
        gr.Markdown("### MoE kernels")
        tune_line = gr.Markdown(elem_id="ss-tune-line")
        with gr.Row():
            tune_button = gr.Button(
                "Tune MoE kernels", interactive=False, elem_id="ss-tune-button", scale=0
            )
            tune_cancel = gr.Button(
                "Cancel tuning",
                variant="stop",
                interactive=False,
                elem_id="ss-tune-cancel",
                scale=0,
            )
        tune_note = gr.Markdown(elem_id="ss-tune-note", elem_classes="ss-muted")
        with gr.Column(visible=False, elem_id="ss-tune-confirm") as confirm_box:
            confirm_text = gr.Markdown(elem_id="ss-tune-confirm-text")
            with gr.Row():
                tune_go = gr.Button(
                    "Stop the engine and tune", variant="stop", elem_id="ss-tune-go", scale=0
                )
                tune_back = gr.Button("Not now", elem_id="ss-tune-back", scale=0)
        tune_progress = gr.HTML(elem_id="ss-tune-progress")
        tune_error = gr.Markdown(elem_id="ss-tune-error")
        seen = gr.State(-1)
        tune_seen = gr.State(None)
        timer = gr.Timer(1.0, active=False)

    def refresh(seen_version: int, tune_shown: TuneView | None) -> Any:
        return [*_panel(controller.view(seen_version)), *_tune_outputs(tuning.view(), tune_shown)]

    tune_outputs = [tune_line, tune_button, tune_cancel, tune_note, tune_progress, tune_error]
    tune_outputs.append(tune_seen)
    outputs = [button, timeline, failure, effective, logs, seen, *tune_outputs]
    state = [seen, tune_seen]
    timer.tick(refresh, state, outputs, show_progress="hidden", concurrency_limit=None)
    poll_while_visible(PANEL, [timer], refresh, state, outputs)

    def on_press(label: str, name: str | None, mtp_on: bool, sleep_on: bool) -> Any:
        try:
            notice = controller.press(label, name, mtp_on, sleep_on)
        except ApplianceError as err:
            raise gr.Error(str(err)) from err
        if notice:
            gr.Info(notice)
        return _panel(controller.view(-1))

    button.click(
        on_press,
        [button, profile, mtp, sleep],
        outputs[:6],
        show_progress="hidden",
        concurrency_limit=1,
        concurrency_id="ss-engine-button",
    )

    def on_ask() -> Any:
        """The Tune button: say what stops and for how long; nothing stops before `on_go`."""
        try:
            text = tuning.confirm()
        except ApplianceError as err:
            return gr.Column(visible=False), gr.skip(), f"**{html.escape(str(err))}**"
        return gr.Column(visible=True), text, ""

    def on_go(tune_shown: TuneView | None) -> Any:
        return [gr.Column(visible=False), *_tune_outputs(tuning.start(), tune_shown, clear=True)]

    def on_cancel(tune_shown: TuneView | None) -> Any:
        return _tune_outputs(tuning.cancel(), tune_shown)

    tune_button.click(on_ask, None, [confirm_box, confirm_text, tune_error], show_progress="hidden")
    tune_go.click(
        on_go,
        [tune_seen],
        [confirm_box, *tune_outputs],
        show_progress="hidden",
        concurrency_limit=1,
        concurrency_id="ss-tune-go",
    )
    tune_back.click(lambda: gr.Column(visible=False), None, [confirm_box], queue=False)
    tune_cancel.click(on_cancel, [tune_seen], tune_outputs, show_progress="hidden")
    profile.change(
        switches, [profile, mtp, sleep], [mtp, sleep], show_progress="hidden", queue=False
    )
    root = gr.context.Context.root_block
    if root is not None:
        root.load(switches, [profile, mtp, sleep], [mtp, sleep], show_progress="hidden")


_STYLE = """<style>
.ss-timeline .ss-headline { font-size: 1.2em; font-weight: 600; margin: 0.3em 0; }
.ss-timeline .ss-headline, .ss-failure b {
  font-family: ui-sans-serif, system-ui, "DejaVu Sans", sans-serif; }
.ss-steps { list-style: none; padding-left: 0; margin: 0.3em 0; }
.ss-step { display: grid; grid-template-columns: 1.5em 14em 6em 1fr; padding: 0.1em 0; }
.ss-step.ss-pending { opacity: 0.5; }
.ss-step.ss-active .ss-mark { color: #2563eb; }
.ss-step.ss-done .ss-mark { color: #16a34a; }
.ss-step.ss-failed .ss-mark, .ss-failure .ss-reason { color: #dc2626; }
.ss-elapsed { text-align: right; padding-right: 1em; font-variant-numeric: tabular-nums; }
.ss-lastline code { font-size: 0.85em; white-space: pre-wrap; }
.ss-failure { border: 1px solid #dc2626; border-radius: 6px; padding: 0.5em 1em; }
.ss-tail { max-height: 20em; overflow: auto; font-size: 0.8em; }
.ss-tune-line { font-family: ui-sans-serif, system-ui, "DejaVu Sans", sans-serif;
  font-weight: 600; margin: 0.3em 0; }
#ss-tune-progress .ss-bar { height: 8px; background: #e5e7eb; border-radius: 4px;
  overflow: hidden; }
#ss-tune-progress .ss-bar-fill { height: 100%; background: #6366f1; }
#ss-tune-confirm { border: 1px solid #dc2626; border-radius: 6px; padding: 0.5em 1em; }
#ss-tune-error p { color: #dc2626; }
.ss-muted { color: #6b7280; font-size: 0.85em; }
</style>"""
