"""The Model tab's tuned-kernels line and Tune button, and the before/after pairing of runs.

Two questions an owner asks after `tune-moe` (issue 14, items 3 and 4): does this GPU run tuned
MoE kernels with this engine image, and what did tuning change? The first is read from the
folder exactly as vLLM reads it (its file name for this GPU and shape, its JSON format:
appliance/bench/tune.py cites the source); the second pairs the last benchmark run before the
config was installed with the first one after it.

`TunePanel` is the tab's button: the service's one `TuneRunner` (the same one `step-station
tune-moe` reaches), run in a thread of the panel's own so that a page never holds an event for
the hours tuning takes; the page polls `view()`.

No gradio here (the layer rules): the tabs in ui/ show `text`, the pair's rows and the views.
"""

from __future__ import annotations

import html
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal, Protocol

from appliance.bench import tune
from appliance.bench.store import StoredRun
from appliance.bench.tuning import (
    TuneOutcome,
    TuneRequest,
    TuneState,
    TuneTarget,
    last_install,
    stop_message,
)
from appliance.errors import ApplianceError
from appliance.units import fmt_duration

TunedState = Literal["tuned", "other_image", "not_tuned", "broken", "unknown"]

# What the pair compares: (label, vLLM's result key, higher is better).
COMPARED = (
    ("Output tokens/s", "output_throughput", True),
    ("Requests/s", "request_throughput", True),
    ("TTFT mean (ms)", "mean_ttft_ms", False),
    ("TPOT mean (ms)", "mean_tpot_ms", False),
)


@dataclass(frozen=True)
class TunedView:
    """One line for the Model tab and what it is about."""

    state: TunedState
    text: str  # markdown, file names escaped
    file_name: str = ""
    installed_at: float | None = None  # when the file was installed (or written, if by hand)


def tuned_view(
    folder: Path,
    shape: tune.MoeShape | None,
    gpu_name: str,
    image_digest: str = "",
    *,
    why_unknown: str = "",
) -> TunedView:
    """Whether vLLM will find a tuned config for this GPU and shape, made with this image."""
    if shape is None or not gpu_name:
        reason = why_unknown or "the GPU or the model's expert shape is not known yet"
        return TunedView("unknown", f"Tuned MoE kernels: cannot tell ({_md(reason)}).")
    found = tune.find_config(folder, shape, gpu_name)
    name = found.file_name
    code = _code(name)
    if not found.exists or found.file is None:
        return TunedView(
            "not_tuned",
            f"Not tuned for {_md(gpu_name)}: vLLM looks for {code} and, without it, uses its "
            "default MoE kernels. `step-station tune-moe` tunes them (the engine is stopped "
            "for hours).",
            name,
        )
    if not found.usable:
        return TunedView(
            "broken",
            f"{code} is not in vLLM's format ({_md(found.file.problems[0])}): engine starts "
            "leave the tuned folder out until it is tuned again or removed.",
            name,
        )
    record = last_install(folder, name)
    when = record.installed_at if record else found.path.stat().st_mtime
    sizes = len(found.file.batch_sizes)
    triton = f", Triton {_md(found.file.triton_version)}" if found.file.triton_version else ""
    date = _date(when)
    if record is not None and image_digest and record.image_digest != image_digest:
        return TunedView(
            "other_image",
            f"Tuned for {_md(gpu_name)} with another engine image ({code}, {sizes} batch sizes"
            f"{triton}, {date}). vLLM still uses it; tune again to match this image's Triton.",
            name,
            when,
        )
    if record is None:
        made_with = "an unrecorded image"  # copied in by hand
    elif image_digest:
        made_with = "this engine image"
    else:  # the engine's image digest is not known here (not pulled, or not Docker)
        made_with = f"image {_md(record.image_digest[:19] or record.image or 'unknown')}"
    return TunedView(
        "tuned",
        f"Tuned for {_md(gpu_name)} with {made_with}: {code} ({sizes} batch sizes{triton}, "
        f"installed {date}).",
        name,
        when,
    )


def tuned_view_for(folder: Path, target: TuneTarget | None, why_unknown: str = "") -> TunedView:
    """`tuned_view` for the engine as the tuner sees it (`control.tune_target`; None with the
    reason when that failed: no checkpoint on disk yet, a process engine, an NVFP4 checkpoint)."""
    if target is None:
        return tuned_view(folder, None, "", why_unknown=why_unknown)
    try:
        shape = tune.moe_shape(target.text_config, block_shape=target.block_shape)
    except ApplianceError as err:
        return tuned_view(folder, None, "", why_unknown=err.message)
    return tuned_view(folder, shape, target.gpu_name, target.image_digest)


@dataclass(frozen=True)
class BeforeAfter:
    """The two benchmark runs either side of tuning, and their numbers side by side."""

    before: StoredRun | None
    after: StoredRun | None
    text: str
    rows: list[list[str]] = field(default_factory=list)  # metric, before, after, change


def before_after(runs: Sequence[StoredRun], installed_at: float) -> BeforeAfter:
    """The first run after the config's install, and the last run before it with the same
    profile, preset and GPU (a pair that differs in anything but the kernels says nothing
    about tuning). `runs` in any order (the store lists newest first)."""
    ordered = sorted(runs, key=lambda r: (r.created_at, r.id))
    after = next((r for r in ordered if r.created_at >= installed_at), None)
    if after is None:
        return BeforeAfter(
            None,
            None,
            "No benchmark since tuning: start the engine and run `step-station bench` to see "
            "what it changed.",
        )
    earlier = [r for r in ordered if r.created_at < installed_at and _same_setup(r, after)]
    if not earlier:
        return BeforeAfter(
            None,
            after,
            f"No run before tuning with the same profile, preset and GPU as run {after.id} "
            f"({_md(after.info.profile)}, {_md(after.info.preset)}) to compare it with.",
        )
    before = earlier[-1]
    rows = [_row(label, key, higher, before, after) for label, key, higher in COMPARED]
    return BeforeAfter(
        before,
        after,
        f"Run {before.id} (before tuning) against run {after.id} (after), "
        f"{_md(after.info.profile)} / {_md(after.info.preset)}.",
        [row for row in rows if row],
    )


def _same_setup(run: StoredRun, other: StoredRun) -> bool:
    a, b = run.info, other.info
    return (a.profile, a.preset, a.gpu_name, dict(a.flags)) == (
        b.profile,
        b.preset,
        b.gpu_name,
        dict(b.flags),
    )


def _row(label: str, key: str, higher: bool, before: StoredRun, after: StoredRun) -> list[str]:
    old, new = before.raw.get(key), after.raw.get(key)
    if not isinstance(old, (int, float)) or not isinstance(new, (int, float)):
        return []
    change = f"{(new - old) / old * 100:+.1f}%" if old else "n/a"
    if old and new != old:
        change += " (better)" if (new > old) == higher else " (worse)"
    return [label, f"{old:.2f}", f"{new:.2f}", change]


def _date(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def _code(name: str) -> str:
    # Markdown takes a code span's text as it is (no escapes inside): only a backtick could end it.
    return "`" + name.replace("`", "'") + "`"


def _md(text: str) -> str:
    """Text for markdown: HTML escaped, and the characters markdown would act on escaped."""
    escaped = html.escape(text, quote=False)
    for ch in "\\`*_[]":
        escaped = escaped.replace(ch, "\\" + ch)
    return escaped


# ------------------------------------------------------------------ the Benchmark tab's pair

NO_RUN_AFTER = "No run after tuning yet: restart the engine and run the same preset"
NOT_TUNED_YET = (
    "Not tuned yet: tune the MoE kernels on the Model tab, start the engine again and run the "
    "same preset as before; the two runs show here side by side."
)


def pair_headers(pair: BeforeAfter) -> list[str]:
    """The side-by-side table's header, naming the two runs."""
    before = f"Before (run {pair.before.id})" if pair.before else "Before"
    after = f"After (run {pair.after.id})" if pair.after else "After"
    return ["Metric", before, after, "Change"]


def before_after_section(runs: Sequence[StoredRun], tuned: TunedView) -> BeforeAfter:
    """The Benchmark tab's "Before / after tuning": the pair either side of the install of the
    config vLLM loads now (the Model tab's `tuned` line says which one that is)."""
    if tuned.installed_at is None:
        # nothing installed to split at: the line says why (cannot tell, broken) or not tuned
        text = tuned.text if tuned.state in ("unknown", "broken") else NOT_TUNED_YET
        return BeforeAfter(None, None, text)
    pair = before_after(runs, tuned.installed_at)
    if pair.after is not None:
        return pair
    earlier = [r for r in runs if r.created_at < tuned.installed_at]
    last = max(earlier, key=lambda r: (r.created_at, r.id), default=None)
    same = f" ({_md(last.info.preset)}, as run {last.id} before tuning)" if last else ""
    return BeforeAfter(None, None, f"{NO_RUN_AFTER}{same}.")


# ------------------------------------------------------------------- the Model tab's button

# How long the engine-as-the-tuner-sees-it is kept: building it reads the checkpoint's
# config.json and asks the runtime for the image digest, too much for every page's 1 s poll.
TARGET_TTL_S = 15.0
UNAVAILABLE = "Tuning is unavailable here, for the reason in the line above."
STAYS_STOPPED = "The engine stays stopped: Start above starts it again."
TUNE_HINT = (
    "When it ends the engine stays stopped: Start above starts it with the tuned kernels; then "
    "run the same benchmark preset again and the Benchmark tab shows the two runs side by side."
)


class Tuner(Protocol):
    """What the tab needs of `appliance.bench.tuning.TuneRunner` (the service's one)."""

    folder: Path

    def run(
        self,
        request: TuneRequest,
        target: TuneTarget,
        stop_engine: Callable[[str], object],
        on_progress: Callable[[TuneState], None] | None = None,
    ) -> TuneOutcome: ...

    def cancel(self) -> bool: ...

    def current(self) -> TuneState | None: ...

    def ensure_idle(self) -> None: ...


class TargetCache:
    """`control.tune_target` (or the error that says why there is none), kept `ttl_s` seconds."""

    def __init__(
        self,
        make: Callable[[], TuneTarget],
        *,
        ttl_s: float = TARGET_TTL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._make = make
        self._ttl_s = ttl_s
        self._clock = clock
        self._lock = threading.Lock()
        self._kept: tuple[float, TuneTarget | None, ApplianceError | None] | None = None

    def get(self, *, fresh: bool = False) -> tuple[TuneTarget | None, str]:
        """(target, "") or (None, why: what happened and what to do)."""
        target, err = self._read(fresh)
        return target, str(err) if err is not None else ""

    def require(self) -> TuneTarget:
        """A target read now; raises the error that says why there is none."""
        target, err = self._read(True)
        if target is None:
            raise err or ApplianceError("The engine cannot be tuned.")
        return target

    def _read(self, fresh: bool) -> tuple[TuneTarget | None, ApplianceError | None]:
        now = self._clock()
        with self._lock:
            kept = self._kept
        if kept is not None and not fresh and now - kept[0] < self._ttl_s:
            return kept[1], kept[2]
        target: TuneTarget | None = None
        error: ApplianceError | None = None
        try:
            target = self._make()
        except ApplianceError as err:
            error = err
        with self._lock:
            self._kept = (now, target, error)
        return target, error


@dataclass(frozen=True)
class TuneView:
    """The tab's tuning section at one moment."""

    line: str  # markdown: whether tuned configs exist for this GPU and image
    can_tune: bool
    why_not: str  # markdown: why the button is off, where the line does not say it already
    running: bool
    progress: str  # the run in progress, or how the last one ended ("" before any)
    fraction: float | None = None  # batch sizes done / total while running
    error: str = ""


class TunePanel:
    """One per service; every page shares it (the runner allows one tuning at a time)."""

    def __init__(
        self,
        runner: Tuner,
        target: Callable[[], TuneTarget],
        stop_engine: Callable[[str], object],
        *,
        bench_idle: Callable[[], None] = lambda: None,
        request: TuneRequest | None = None,
        wall: Callable[[], float] = time.time,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.runner = runner
        self.targets = TargetCache(target, clock=clock)
        self._stop_engine = stop_engine
        self._bench_idle = bench_idle
        self.request = request or TuneRequest()
        self._wall = wall
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._last: TuneOutcome | None = None
        self._error = ""

    # --------------------------------------------------------------------------- reading

    def tuned(self, *, fresh: bool = False) -> TunedView:
        target, why = self.targets.get(fresh=fresh)
        return tuned_view_for(self.runner.folder, target, why)

    def view(self) -> TuneView:
        state = self.runner.current()
        target, why = self.targets.get()
        tuned = tuned_view_for(self.runner.folder, target, why)
        with self._lock:
            last, error = self._last, self._error
        if state is not None:
            return TuneView(
                tuned.text,
                False,
                "MoE tuning is running (Cancel stops it).",
                True,
                tuning_line(state, self._wall()),
                state.done / state.total if state.total else None,
            )
        # without a target the line says why ("cannot tell (...)"): the note points at it
        why_not = UNAVAILABLE if target is None else self._bench_busy()
        if error:
            progress = "The tuning did not finish."
        elif last is not None:
            progress = outcome_line(last)
        else:
            progress = ""
        return TuneView(
            tuned.text, target is not None and not why_not, why_not, False, progress, error=error
        )

    def _bench_busy(self) -> str:
        try:
            self._bench_idle()
        except ApplianceError as err:
            return _md(str(err))
        return ""

    # --------------------------------------------------------------------------- actions

    def confirm(self) -> str:
        """What the person reads before anything stops (markdown); raises when tuning cannot
        start now (a benchmark or a tuning runs, the engine cannot be tuned)."""
        target = self._check()
        sizes = len(set(self.request.batch_sizes))
        return (
            f"**The engine will be stopped.** {_md(stop_message(sizes, target.gpu_name))}\n\n"
            f"{TUNE_HINT}"
        )

    def start(self) -> TuneView:
        """Start tuning in the background (the engine is stopped first, by the runner); an error
        that stops it from starting is in the returned view's `error`."""
        try:
            target = self._check()
        except ApplianceError as err:
            # told in this answer only: a refused second start leaves the run going as it was
            view = self.view()
            return TuneView(
                view.line,
                view.can_tune,
                view.why_not,
                view.running,
                view.progress,
                view.fraction,
                str(err),
            )
        with self._lock:
            self._error = ""
            self._last = None
            thread = threading.Thread(
                target=self._run, args=(target,), name="tune-panel", daemon=True
            )
            self._thread = thread
        thread.start()
        return self.view()

    def cancel(self) -> TuneView:
        self.runner.cancel()
        return self.view()

    def wait(self, timeout_s: float) -> bool:
        """Block until the background run ends (tests); False on timeout."""
        thread = self._thread
        if thread is None:
            return True
        thread.join(timeout_s)
        return not thread.is_alive()

    # ---------------------------------------------------------------------------- inside

    def _check(self) -> TuneTarget:
        self.runner.ensure_idle()
        self._bench_idle()  # before anything stops: the runner would refuse it later anyway
        return self.targets.require()

    def _run(self, target: TuneTarget) -> None:
        try:
            outcome = self.runner.run(self.request, target, self._stop_engine)
        except ApplianceError as err:
            with self._lock:
                self._error = str(err)
            return
        finally:
            self.targets.get(fresh=True)  # the tuned line reads the new install at once
        with self._lock:
            self._last = outcome


def tuning_line(state: TuneState, now: float) -> str:
    """The run in progress in one line: batch sizes done of all, time spent, time left."""
    if state.cancelling:
        return "Cancelling the MoE tuning..."
    elapsed = fmt_duration(max(0.0, now - state.started_at)) if state.started_at else "0 s"
    if state.remaining_s is not None:
        left = f"about {fmt_duration(state.remaining_s)} left"
    else:
        left = "time left known after the first batch size"
    return (
        f"Tuning MoE kernels: {state.done}/{state.total} batch sizes done, {elapsed}, {left}. "
        "The engine is stopped meanwhile."
    )


def outcome_line(outcome: TuneOutcome) -> str:
    if outcome.completed:
        return (
            f"Tuning finished in {fmt_duration(outcome.elapsed_s)}: {outcome.file_name} installed "
            f"({len(outcome.batch_sizes)} batch sizes). {outcome.note}"
        )
    return f"Tuning cancelled; nothing was installed. {STAYS_STOPPED}"
