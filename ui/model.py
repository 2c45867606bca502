"""The model tab: pick a profile, start and stop the engine, watch the start-up timeline.

Layout and wiring only. The engine is the supervisor's (`services.supervisor`); the timeline,
rates and failure text come from `appliance.monitoring.timeline`; which profiles fit comes from
the planner.
One Start/Stop button follows the engine's state on every page; a click carries the label the
user saw, so a "Start" clicked on a page that has not caught up yet never stops an engine another
page just started (and the supervisor never starts a second one).
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from typing import Any

import gradio as gr

from appliance import hardware, planner, profiles
from appliance.engine.state import EngineState, EngineStatus
from appliance.errors import ApplianceError
from appliance.monitoring.timeline import (
    ProgressRates,
    Timeline,
    build_timeline,
    compact_log,
    fmt_duration,
)
from appliance.services import Services
from appliance.settings import save_settings
from ui.polling import panel, poll_while_visible

PANEL = "ss-model"
START, STOP, STOPPING = "Start", "Stop", "Stopping…"
_STARTABLE = (EngineState.ABSENT, EngineState.STOPPED, EngineState.FAILED)

_CSS_STATE = {
    "done": ("✓", "ss-done"),
    "active": ("●", "ss-active"),
    "pending": ("○", "ss-pending"),
    "failed": ("✗", "ss-failed"),
}


# ------------------------------------------------------------------------------ profile choice


@dataclass
class ProfileChoices:
    """Which profiles the picker offers, and why the others are not offered."""

    offered: list[str]
    default: str | None
    unfit: dict[str, list[str]] = field(default_factory=dict)
    note: str = ""


def profile_choices(services: Services) -> ProfileChoices:
    """Fitting profiles on this machine; all of them when the engine gets no GPU (demo, tests)."""
    settings = services.settings
    plan = planner.plan(hardware.detect(), engine_settings=settings.engine)
    unfit = {f.name: f.reasons for f in plan.profiles if not f.fits}
    wanted = settings.engine.profile
    if services.demo or not settings.engine.request_gpu:
        offered = list(profiles.PROFILES)
        note = (
            "The engine runs without a GPU here (demo or simulator), so every profile can be "
            "picked; on this machine's GPUs these would not fit:"
        )
        default = wanted if wanted in offered else "fp8-tp1"
        return ProfileChoices(offered, default, unfit, note)
    offered = [f.name for f in plan.profiles if f.fits]
    default = wanted if wanted in offered else (plan.chosen or "")
    return ProfileChoices(offered, default, unfit, "Not offered on this machine:")


def _profile_label(name: str) -> str:
    prof = profiles.get_profile(name)
    return f"{name}: {prof.summary}" if prof.summary else name


def unfit_markdown(choices: ProfileChoices) -> str:
    if not choices.unfit:
        return ""
    lines = [choices.note]
    for name, reasons in choices.unfit.items():
        lines.append(f"- **{name}**: {'; '.join(reasons) or 'does not fit'}")
    return "\n".join(lines)


def switches(name: str | None, mtp: bool, sleep: bool) -> tuple[Any, Any]:
    """MTP and sleep-mode checkboxes for a profile: offered only where the profile allows."""
    if not name:
        return gr.Checkbox(interactive=False), gr.Checkbox(interactive=False)
    prof = profiles.get_profile(name)
    if prof.seed_has_mtp:
        mtp_box = gr.Checkbox(value=True, interactive=False, info="always on in this profile")
    elif prof.supports_mtp:
        mtp_box = gr.Checkbox(value=mtp, interactive=True, info="MTP-3 speculative decoding")
    else:
        mtp_box = gr.Checkbox(
            value=False, interactive=False, info="this checkpoint has no MTP weights"
        )
    if prof.supports_sleep:
        sleep_box = gr.Checkbox(value=sleep, interactive=True, info="sleep when idle, wake on use")
    else:
        sleep_box = gr.Checkbox(value=False, interactive=False, info="not for this profile")
    return mtp_box, sleep_box


# ------------------------------------------------------------------------------------ rendering


def button_for(status: EngineStatus) -> Any:
    if status.state == EngineState.STOPPING:
        return gr.Button(value=STOPPING, variant="secondary", interactive=False)
    if status.state in _STARTABLE:
        return gr.Button(value=START, variant="primary", interactive=True)
    return gr.Button(value=STOP, variant="stop", interactive=True)


def timeline_html(status: EngineStatus, tl: Timeline) -> str:
    state = html.escape(status.state.value)
    parts = [
        f'<div class="ss-timeline" data-state="{state}">',
        f'<div class="ss-headline" id="ss-headline">{html.escape(tl.headline)}</div>',
    ]
    if status.restart_needed:
        parts.append(
            '<div class="ss-retry" id="ss-restart-needed">Settings changed since the engine '
            "started: stop and start it to apply them.</div>"
        )
    if status.retry_note:
        parts.append(
            f'<div class="ss-retry">Retried once with {html.escape(status.retry_note)}</div>'
        )
    for note in status.notes:  # flags dropped for this image, a template without the effort
        parts.append(f'<div class="ss-retry ss-note">{html.escape(note)}</div>')
    if tl.steps:
        parts.append('<ol class="ss-steps">')
        for step in tl.steps:
            mark, css = _CSS_STATE.get(step.state, ("", ""))
            elapsed = fmt_duration(step.elapsed_s) if step.elapsed_s is not None else ""
            detail = html.escape(step.detail)
            parts.append(
                f'<li class="ss-step {css}" data-step="{html.escape(step.name)}" '
                f'data-status="{step.state}"><span class="ss-mark">{mark}</span> '
                f'<span class="ss-name">{html.escape(step.name)}</span>'
                f'<span class="ss-elapsed">{elapsed}</span>'
                f'<span class="ss-detail">{detail}</span></li>'
            )
        parts.append("</ol>")
    if tl.last_line and status.state.busy:
        parts.append(
            f'<div class="ss-lastline"><code>{html.escape(tl.last_line[-300:])}</code></div>'
        )
    parts.append("</div>")
    return "".join(parts)


def failure_html(tl: Timeline) -> str:
    if not tl.failed:
        return ""
    tail = "\n".join(tl.log_tail) or "(the engine wrote no log lines)"
    return (
        '<div class="ss-failure" id="ss-failure-box">'
        f'<p class="ss-reason"><b>What happened:</b> {html.escape(tl.reason)}</p>'
        f'<p class="ss-what"><b>What to do:</b> {html.escape(tl.what_to_do)}</p>'
        f'<details open><summary>Last log lines</summary><pre class="ss-tail">'
        f"{html.escape(tail)}</pre></details></div>"
    )


def _precision(status: EngineStatus) -> str:
    try:
        prof = profiles.get_profile(status.profile)
    except ApplianceError:
        return "n/a"
    kv = f", {prof.kv_cache_dtype.upper()} KV cache" if prof.kv_cache_dtype else ""
    return f"{prof.precision.upper()} weights{kv}"


def effective_markdown(status: EngineStatus) -> str:
    eff = status.effective
    if not eff and not status.profile:
        return "*The engine's settings appear here once it starts.*"

    def val(key: str, fmt: str = "{}") -> str:
        value = eff.get(key)
        return "n/a" if value in (None, "") else fmt.format(value)

    ctx = eff.get("max_model_len")
    command = str(eff.get("command") or "")
    rows = [
        ("Model", val("model")),
        ("Served as", status.served_model_name or val("served_model_name")),
        ("Profile", status.profile or "n/a"),
        ("Precision", _precision(status)),
        ("Context length", f"{ctx:,} tokens" if isinstance(ctx, int) else "n/a"),
        ("KV-cache tokens", val("kv_cache_tokens", "{:,}")),
        ("KV-cache memory", val("kv_cache_gib", "{} GiB")),
        ("Weights in GPU memory", val("weights_gib", "{} GiB")),
        ("GPU memory fraction", val("gpu_memory_utilization")),
        ("MTP speculative decoding", "on" if "--speculative-config" in command else "off"),
        ("vLLM", val("vllm_version")),
        ("Image", val("image")),
    ]
    if "retry" in eff:
        rows.append(("Retried with", str(eff["retry"])))
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    return "| Setting | Value |\n|---|---|\n" + table


def log_text(status: EngineStatus) -> str:
    return "\n".join(compact_log(status.log_tail))


# -------------------------------------------------------------------------------------- actions


def _apply_choice(services: Services, name: str, mtp: bool, sleep: bool) -> None:
    """Make the picked profile and switches the engine's settings (and save them)."""
    supervisor = services.supervisor
    targets = [supervisor.settings.engine, services.settings.engine]
    changed = any(
        (e.profile, e.mtp, e.sleep_mode) != (name, bool(mtp), bool(sleep)) for e in targets
    )
    if not changed:
        return
    for engine in targets:
        engine.profile, engine.mtp, engine.sleep_mode = name, bool(mtp), bool(sleep)
    save_settings(services.settings)
    supervisor.apply_settings(supervisor.settings)


ALREADY_STARTED = "The engine is already starting or running (started from another page)."


def press(services: Services, seen_label: str, name: str | None, mtp: bool, sleep: bool) -> None:
    """The one button: start when it said Start, stop when it said Stop; the engine decides."""
    supervisor = services.supervisor
    status = supervisor.status()
    if seen_label == START:
        if status.state not in _STARTABLE:
            gr.Info(ALREADY_STARTED)
            return
        if not name:
            raise gr.Error("No launch profile fits this machine; see the reasons above.")
        _apply_choice(services, name, mtp, sleep)
        if not supervisor.try_start(name):  # another page's click got there first
            gr.Info(ALREADY_STARTED)
    elif seen_label == STOP:
        if status.state in _STARTABLE:
            return
        supervisor.stop()


# ---------------------------------------------------------------------------------------- build


def build(services: Services) -> None:
    """Create the tab's widgets inside the current gr.Tab and wire them to services."""
    supervisor = services.supervisor
    rates: ProgressRates | None = services.progress_rates
    choices = profile_choices(services)

    with panel(PANEL):
        gr.HTML(_STYLE)
        with gr.Row():
            profile = gr.Dropdown(
                choices=[(_profile_label(n), n) for n in choices.offered],
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
        status = supervisor.status()
        if status.version == seen_version and not status.state.busy:
            return [gr.skip()] * 6
        tl = build_timeline(status, rates)
        changed = status.version != seen_version
        return [
            button_for(status),
            timeline_html(status, tl),
            failure_html(tl) if changed else gr.skip(),
            effective_markdown(status) if changed else gr.skip(),
            log_text(status) if changed else gr.skip(),
            status.version,
        ]

    outputs = [button, timeline, failure, effective, logs, seen]
    timer.tick(refresh, [seen], outputs, show_progress="hidden", concurrency_limit=None)
    poll_while_visible(PANEL, [timer], refresh, [seen], outputs)

    def on_press(label: str, name: str | None, mtp_on: bool, sleep_on: bool) -> Any:
        try:
            press(services, label, name, mtp_on, sleep_on)
        except ApplianceError as err:
            raise gr.Error(str(err)) from err
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
