"""The Benchmark panel's logic: start a run, follow it, cancel it, show and export past runs.

The run is the service's one `BenchRunner` (the same one `step-station bench` reaches through the
control socket), so a page and a terminal never run two benchmarks at once and both see the
same run. A page must not block on a run of many minutes: `start()` hands the run to a thread
of its own and returns at once; the page polls `view()` (every second while it is on screen),
which reads the runner's small progress record and never touches the engine.

No gradio here (the layer rules): the tab in ui/ builds widgets and calls these methods.
"""

from __future__ import annotations

import dataclasses
import html
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Protocol

from appliance.bench.presets import PRESETS
from appliance.bench.runner import BenchOutcome, BenchRequest, BenchState, BenchTarget
from appliance.bench.store import StoredRun, export_csv, export_json
from appliance.controllers.tuning import BeforeAfter, TunedView, before_after_section
from appliance.errors import ApplianceError, BadInputError
from appliance.units import NA, fmt_latency

# Columns of the runs table, in the user's words; the values come from vLLM's own keys.
RUN_COLUMNS = (
    "Run",
    "Date (UTC)",
    "Profile",
    "Preset",
    "MTP",
    "Prompts",
    "Requests/s",
    "Output tok/s",
    "TTFT mean",
    "TTFT p99",
    "TPOT mean",
    "ITL mean",
    "MTP acceptance",
    "vLLM",
    "GPU",
)
# What the comparison plot can show per run: (label, vLLM's key, higher is better).
METRICS = (
    ("Output tokens/s", "output_throughput", True),
    ("Requests/s", "request_throughput", True),
    ("TTFT mean (ms)", "mean_ttft_ms", False),
    ("TTFT p99 (ms)", "p99_ttft_ms", False),
    ("TPOT mean (ms)", "mean_tpot_ms", False),
    ("ITL mean (ms)", "mean_itl_ms", False),
)


class Runner(Protocol):
    """What the panel needs of `appliance.bench.runner.BenchRunner`."""

    def run(
        self,
        request: BenchRequest,
        target: BenchTarget,
        on_progress: Callable[[BenchState], None] | None = None,
    ) -> BenchOutcome: ...

    def cancel(self) -> bool: ...

    def current(self) -> BenchState | None: ...

    def ensure_idle(self) -> None: ...

    def list_runs(self) -> list[StoredRun]: ...


@dataclass(frozen=True)
class BenchView:
    """Everything the panel shows at one moment."""

    running: bool
    status: str  # one line: what runs, or how the last run ended
    fraction: float | None  # requests done / total while running
    error: str = ""
    last_id: int | None = None  # the run the last start kept
    rows: list[list[Any]] = field(default_factory=list)


def preset_choices() -> list[tuple[str, str]]:
    """(label, value) pairs for the preset dropdown."""
    return [(f"{p.name}: {p.title}", p.name) for p in PRESETS.values()]


def _opt_int(label: str, value: Any) -> int | None:
    """A number box's value: empty means "the preset's"; anything else a positive integer."""
    if value in (None, ""):
        return None
    try:
        number = int(float(value))
    except (TypeError, ValueError):
        raise BadInputError(f"{label} must be a whole number (got {value!r}).") from None
    if number < 1 or number != float(value):
        raise BadInputError(f"{label} must be a whole number of at least 1 (got {value!r}).")
    return number


class BenchPanel:
    """One per service; every page shares it (the runner allows one run at a time anyway)."""

    def __init__(
        self,
        runner: Runner,
        target: Callable[[], BenchTarget],
        tuned: Callable[[], TunedView] | None = None,
    ) -> None:
        self.runner = runner
        self._target = target
        self._tuned = tuned  # the Model tab's line: which tuned config vLLM loads, since when
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._last: BenchOutcome | None = None
        self._error = ""

    # --------------------------------------------------------------------------- actions

    def start(
        self,
        preset: str,
        num_prompts: Any = None,
        random_input: Any = None,
        random_output: Any = None,
        max_concurrency: Any = None,
        through_gateway: bool = False,
    ) -> BenchView:
        """Start a run in the background; an error that stops it from starting (a wrong number,
        no engine, a run already going) is in the returned view's `error`."""
        try:
            request = BenchRequest(
                preset=preset,
                num_prompts=_opt_int("Prompts", num_prompts),
                random_input=_opt_int("Input tokens", random_input),
                random_output=_opt_int("Output tokens", random_output),
                max_concurrency=_opt_int("Concurrency", max_concurrency),
                through_gateway=bool(through_gateway),
            )
            self.runner.ensure_idle()
            target = self._target()
        except ApplianceError as err:
            # told in this answer only: a refused second start leaves the run going on as it was
            return dataclasses.replace(self.view(), error=str(err))
        with self._lock:
            self._error = ""
            self._last = None
            thread = threading.Thread(
                target=self._run, args=(request, target), name="bench-panel", daemon=True
            )
            self._thread = thread
        thread.start()
        return self.view()

    def _run(self, request: BenchRequest, target: BenchTarget) -> None:
        try:
            outcome = self.runner.run(request, target)
        except ApplianceError as err:
            with self._lock:
                self._error = str(err)
            return
        with self._lock:
            self._last = outcome

    def cancel(self) -> BenchView:
        self.runner.cancel()
        return self.view()

    def wait(self, timeout_s: float) -> bool:
        """Block until the background run ends (tests, and a page closing); False on timeout."""
        thread = self._thread
        if thread is None:
            return True
        thread.join(timeout_s)
        return not thread.is_alive()

    # ----------------------------------------------------------------------------- reading

    def view(self) -> BenchView:
        state = self.runner.current()
        with self._lock:
            last, error = self._last, self._error
        rows = self.rows()
        if state is not None:
            return BenchView(
                running=True,
                status=running_line(state),
                fraction=state.done / state.total if state.total else None,
                rows=rows,
            )
        if error:
            return BenchView(False, "The benchmark did not finish.", None, error=error, rows=rows)
        if last is not None and last.completed:
            return BenchView(
                False, f"Run {last.id} finished and was kept.", 1.0, last_id=last.id, rows=rows
            )
        if last is not None:
            return BenchView(False, "Cancelled; nothing was kept.", None, rows=rows)
        return BenchView(False, "No benchmark running.", None, rows=rows)

    def runs(self) -> list[StoredRun]:
        return self.runner.list_runs()

    def rows(self) -> list[list[Any]]:
        return [run_row(run) for run in self.runs()]

    def before_after(self, runs: Sequence[StoredRun] | None = None) -> BeforeAfter | None:
        """The runs either side of the last tuning, side by side (None: no tuning here)."""
        if self._tuned is None:
            return None
        return before_after_section(self.runs() if runs is None else runs, self._tuned())

    def compare(
        self, run_ids: Sequence[int], metric: str = "output_throughput"
    ) -> list[dict[str, Any]]:
        """Points for a bar plot of one metric over the chosen runs (all runs when none are
        chosen), oldest first: {"run", "label", "value"}."""
        wanted = set(run_ids)
        runs = [r for r in reversed(self.runs()) if not wanted or r.id in wanted]
        return [
            {"run": r.id, "label": run_label(r), "value": float(r.raw[metric])}
            for r in runs
            if isinstance(r.raw.get(metric), (int, float))
        ]

    def export(self, fmt: str, run_ids: Sequence[int] = ()) -> tuple[str, str]:
        """(file name, text) in `vllm bench serve`'s own result format, as JSON or CSV."""
        wanted = set(run_ids)
        runs = [r for r in self.runs() if not wanted or r.id in wanted]
        if fmt == "csv":
            return "step-station-bench.csv", export_csv(runs)
        if fmt == "json":
            return "step-station-bench.json", export_json(runs)
        raise BadInputError(f"Export as json or csv (got {fmt!r}).")


# ------------------------------------------------------------------------------ formatting


def running_line(state: BenchState) -> str:
    via = " through the gateway" if state.through_gateway else ""
    if state.cancelling:
        return f"Cancelling the {state.preset} benchmark..."
    if not state.total:
        return f"Benchmark {state.preset}{via}: starting..."
    return (
        f"Benchmark {state.preset}{via}: {state.done}/{state.total} requests, "
        f"{state.elapsed_s:.0f} s"
    )


def run_label(run: StoredRun) -> str:
    """A run in a plot's axis: its id, profile and MTP."""
    mtp = " MTP" if run.info.flags.get("mtp") else ""
    return f"#{run.id} {run.info.profile}{mtp} {run.info.preset}"


def _ms(raw: Any, key: str) -> str:
    value = raw.get(key)
    return fmt_latency(float(value) / 1000) if isinstance(value, (int, float)) else NA


def run_row(run: StoredRun) -> list[Any]:
    raw = run.raw
    when = datetime.fromtimestamp(run.created_at, tz=timezone.utc).strftime("%Y-%m-%d %H:%M")
    accept = raw.get("spec_decode_acceptance_rate")
    return [
        run.id,
        when,
        run.info.profile,
        run.info.preset,
        "on" if run.info.flags.get("mtp") else "off",
        raw.get("completed", 0),
        round(float(raw.get("request_throughput") or 0.0), 2),
        round(float(raw.get("output_throughput") or 0.0), 1),
        _ms(raw, "mean_ttft_ms"),
        _ms(raw, "p99_ttft_ms"),
        _ms(raw, "mean_tpot_ms"),
        _ms(raw, "mean_itl_ms"),
        f"{float(accept):.1f} %" if isinstance(accept, (int, float)) else NA,
        html.escape(run.info.vllm_version or NA),
        html.escape(run.info.gpu_name or NA),
    ]
