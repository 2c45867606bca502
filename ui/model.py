"""The model tab: pick a profile, start and stop the engine, watch the start-up timeline.

Layout and wiring only: what to show and what the button does is
`appliance.controllers.model.ModelController`'s; this module maps its plain data to widgets and
its errors to `gr.Error`.
"""

from __future__ import annotations

from typing import Any

import gradio as gr

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


def build(services: Services) -> None:
    """Create the tab's widgets inside the current gr.Tab and wire them to services."""
    controller = ModelController(services.supervisor, services.store, services.progress_rates)
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
        seen = gr.State(-1)
        timer = gr.Timer(1.0, active=False)

    def refresh(seen_version: int) -> Any:
        return _panel(controller.view(seen_version))

    outputs = [button, timeline, failure, effective, logs, seen]
    timer.tick(refresh, [seen], outputs, show_progress="hidden", concurrency_limit=None)
    poll_while_visible(PANEL, [timer], refresh, [seen], outputs)

    def on_press(label: str, name: str | None, mtp_on: bool, sleep_on: bool) -> Any:
        try:
            notice = controller.press(label, name, mtp_on, sleep_on)
        except ApplianceError as err:
            raise gr.Error(str(err)) from err
        if notice:
            gr.Info(notice)
        return refresh(-1)

    button.click(
        on_press,
        [button, profile, mtp, sleep],
        outputs,
        show_progress="hidden",
        concurrency_limit=1,
        concurrency_id="ss-engine-button",
    )
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
</style>"""
