"""The model tab's logic: which profiles to offer, the one Start/Stop button, the timeline.

The engine is the supervisor's; this module only asks it. A click carries the label the user
saw, so a "Start" clicked on a page that has not caught up yet never stops an engine another page
just started (and the supervisor never starts a second one). The picked profile and switches
become settings through the settings store, whose subscribers (the supervisor) see the change.
"""

from __future__ import annotations

import html
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from appliance import hardware, planner, profiles
from appliance.engine.protocol import EngineReader, EngineSwitch
from appliance.engine.state import EngineState, EngineStatus
from appliance.errors import ApplianceError, HardwareError
from appliance.monitoring.timeline import ProgressRates, Timeline, build_timeline, compact_log
from appliance.settings import Settings
from appliance.units import fmt_duration

START, STOP, STOPPING = "Start", "Stop", "Stopping…"
STARTABLE = (EngineState.ABSENT, EngineState.STOPPED, EngineState.FAILED)
ALREADY_STARTED = "The engine is already starting or running (started from another page)."
NOTHING_FITS = "No launch profile fits this machine; see the reasons above."
FALLBACK_PROFILE = "fp8-tp1"  # picked first where every profile is offered (no GPU for the engine)

_CSS_STATE = {
    "done": ("✓", "ss-done"),
    "active": ("●", "ss-active"),
    "pending": ("○", "ss-pending"),
    "failed": ("✗", "ss-failed"),
}


class EngineControl(EngineReader, EngineSwitch, Protocol):
    """The part of the engine's owner (engine/protocol.py) the model tab uses."""


class SettingsWriter(Protocol):
    """The settings store: `update({"section.field": value})` validates, saves and notifies
    its subscribers (the supervisor among them)."""

    def update(self, changes: Mapping[str, Any]) -> Settings: ...


# ------------------------------------------------------------------------------ profile choice


@dataclass
class ProfileChoices:
    """Which profiles the picker offers, and why the others are not offered."""

    offered: list[str]
    default: str | None
    unfit: dict[str, list[str]] = field(default_factory=dict)
    note: str = ""


def profile_choices(
    settings: Settings,
    *,
    demo: bool,
    detect: Callable[[], hardware.Hardware] = hardware.detect,
) -> ProfileChoices:
    """Fitting profiles on this machine; all of them when the engine gets no GPU (demo, tests)."""
    plan = planner.plan(detect(), engine_settings=settings.engine)
    unfit = {f.name: f.reasons for f in plan.profiles if not f.fits}
    wanted = settings.engine.profile
    if demo or not settings.engine.request_gpu:
        offered = list(profiles.PROFILES)
        note = (
            "The engine runs without a GPU here (demo or simulator), so every profile can be "
            "picked; on this machine's GPUs these would not fit:"
        )
        default = wanted if wanted in offered else FALLBACK_PROFILE
        return ProfileChoices(offered, default, unfit, note)
    offered = [f.name for f in plan.profiles if f.fits]
    default = wanted if wanted in offered else (plan.chosen or "")
    return ProfileChoices(offered, default, unfit, "Not offered on this machine:")


def profile_label(name: str) -> str:
    prof = profiles.get_profile(name)
    return f"{name}: {prof.summary}" if prof.summary else name


def unfit_markdown(choices: ProfileChoices) -> str:
    if not choices.unfit:
        return ""
    lines = [choices.note]
    for name, reasons in choices.unfit.items():
        lines.append(f"- **{name}**: {'; '.join(reasons) or 'does not fit'}")
    return "\n".join(lines)


@dataclass(frozen=True)
class Switch:
    """One checkbox (MTP or sleep mode) as a profile allows it; `value` None: leave it as it is."""

    value: bool | None
    interactive: bool
    info: str | None = None


def switches(name: str | None, mtp: bool, sleep: bool) -> tuple[Switch, Switch]:
    """MTP and sleep-mode checkboxes for a profile: offered only where the profile allows."""
    if not name:
        return Switch(None, False), Switch(None, False)
    prof = profiles.get_profile(name)
    if prof.seed_has_mtp:
        mtp_box = Switch(True, False, "always on in this profile")
    elif prof.supports_mtp:
        mtp_box = Switch(mtp, True, "MTP-3 speculative decoding")
    else:
        mtp_box = Switch(False, False, "this checkpoint has no MTP weights")
    if prof.supports_sleep:
        sleep_box = Switch(sleep, True, "sleep when idle, wake on use")
    else:
        sleep_box = Switch(False, False, "not for this profile")
    return mtp_box, sleep_box


# ------------------------------------------------------------------------------------ rendering


@dataclass(frozen=True)
class Button:
    label: str
    variant: Literal["primary", "secondary", "stop"]
    interactive: bool


def button_for(status: EngineStatus) -> Button:
    if status.state == EngineState.STOPPING:
        return Button(STOPPING, "secondary", False)
    if status.state in STARTABLE:
        return Button(START, "primary", True)
    return Button(STOP, "stop", True)


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


@dataclass(frozen=True)
class EngineView:
    """The tab's engine panel. `failure`, `effective` and `log` are None where they are unchanged
    since the version the page saw (the page keeps what it shows)."""

    button: Button
    timeline: str
    failure: str | None
    effective: str | None
    log: str | None
    version: int


# ------------------------------------------------------------------------------------ controller


class ModelController:
    """What the model tab shows and what its button does."""

    def __init__(
        self, engine: EngineControl, store: SettingsWriter, rates: ProgressRates | None = None
    ) -> None:
        self.engine = engine
        self.store = store
        self.rates = rates

    def view(self, seen_version: int) -> EngineView | None:
        """The panel for a page that last saw `seen_version`; None when nothing moved (a busy
        engine is redrawn anyway: its elapsed times and rates move without a new version)."""
        status = self.engine.status()
        if status.version == seen_version and not status.state.busy:
            return None
        tl = build_timeline(status, self.rates)
        changed = status.version != seen_version
        return EngineView(
            button=button_for(status),
            timeline=timeline_html(status, tl),
            failure=failure_html(tl) if changed else None,
            effective=effective_markdown(status) if changed else None,
            log=log_text(status) if changed else None,
            version=status.version,
        )

    def press(self, seen_label: str, name: str | None, mtp: bool, sleep: bool) -> str | None:
        """The one button: start when it said Start, stop when it said Stop; the engine decides.
        Returns a notice for the user (None: nothing to say); raises when nothing can start."""
        status = self.engine.status()
        if seen_label == START:
            if status.state not in STARTABLE:
                return ALREADY_STARTED
            if not name:
                raise HardwareError(NOTHING_FITS)
            # The store saves and tells the supervisor (a running engine notes "restart
            # needed"); the same choice again changes nothing.
            self.store.update(
                {"engine.profile": name, "engine.mtp": bool(mtp), "engine.sleep_mode": bool(sleep)}
            )
            if not self.engine.try_start(name):  # another page's click got there first
                return ALREADY_STARTED
        elif seen_label == STOP and status.state not in STARTABLE:
            self.engine.stop()
        return None
