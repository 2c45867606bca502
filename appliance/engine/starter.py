"""The starter: from a start request to a serving engine, on the supervisor's worker thread.

The pipeline: build the launch spec, adopt an engine already running under the name (another
step-station started it), pull the image, check the engine's flags, fetch the weights, launch,
wait until /health answers, and retry once with safer settings when the engine ran out of
memory. Then the monitor watches it. Adopting a running engine (here or at attach) also goes
through here: `adopt`, then `watch_adopted` waits for it to be ready.

What it shares: the state goes through the status board (`board.lock` guards it); the log
follower reads the launched engine's log (the retry reads the failure line from the tracker on
the board); the shared `cancel` event ends every step early (a stop). Creating or removing the
engine holds the inter-process engine lock (`lock.py`) so another step-station never races it;
waiting for the engine happens outside that lock.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Callable
from typing import Any

from appliance import endpoint
from appliance.engine import compat, engine_key, health, phases
from appliance.engine.board import DOWNLOADING, PULLING, StatusBoard, phase_name
from appliance.engine.context import EngineContext
from appliance.engine.exits import Outcome, exited_outcome, fail_engine
from appliance.engine.launch import with_fresh_engine_key
from appliance.engine.lock import EngineLock
from appliance.engine.log_follower import LogFollower
from appliance.engine.monitor import Monitor
from appliance.engine.runtime import EngineExit, EngineHandle
from appliance.engine.sleeper import Sleeper
from appliance.engine.spec import LABEL_PROFILE, LABEL_SERVED_NAME, LaunchSpec, safer_spec
from appliance.engine.state import EngineState
from appliance.errors import ApplianceError, DockerUnavailableError, EngineError, SettingsError
from appliance.profiles import VLLM_DEFAULT_GPU_MEMORY_UTILIZATION
from appliance.units import fmt_progress

log = logging.getLogger(__name__)

RETRYABLE = phases.RETRYABLE_FAILURES
_RETRY_REASON = {
    phases.CUDA_OOM: "Out of GPU memory",
    phases.MAX_LEN_TOO_LARGE: "The context length did not fit in the KV cache",
    phases.MEMORY_IN_USE: "Less free memory than the engine asked for",
}
# vLLM's start-up memory check, GPU (`v1/worker/utils.py`) and CPU (`v1/worker/cpu_worker.py`):
# "Free memory on device D (F/T GiB) on startup is less than desired GPU memory utilization (U, R
# GiB)" / "Available memory on node N (F/T GiB) on startup is less than desired CPU memory ...".
_FREE_MEMORY = re.compile(r"\(([\d.]+)/([\d.]+) GiB\) on startup is less than desired")
_FREE_MARGIN = 0.05  # of the total, left to other programs when the retry follows the free memory
KEY_LOST_NOTE = (
    "The running engine's key file is gone (the data folder was cleared?), so the appliance "
    "cannot use it: restart the engine (`step-station restart`) to give it a new key."
)

SpecFor = Callable[["str | None"], LaunchSpec]
WeightsFetcher = Callable[..., object]


class Starter:
    """Starts the engine (or adopts the one running) and brings it to serving."""

    def __init__(
        self,
        ctx: EngineContext,
        board: StatusBoard,
        logs: LogFollower,
        monitor: Monitor,
        sleeper: Sleeper,
        *,
        spec_for: SpecFor,
        weights_fetcher: WeightsFetcher | None,
        demo: bool,
    ) -> None:
        self._ctx = ctx
        self._board = board
        self._logs = logs
        self._monitor = monitor
        self._sleeper = sleeper
        self._spec_for = spec_for
        self._weights_fetcher = weights_fetcher
        self._demo = demo
        self.engine_key = ""  # this start's engine key (engine_key.py); "" for none

    def run(self, profile: str | None) -> None:
        """The whole start, then the watch (the worker thread's job after `try_start`)."""
        ctx = self._ctx
        settings = ctx.settings
        spec = self._spec_for(profile)
        self._board.update(
            profile=spec.profile,
            served_model_name=spec.served_model_name,
            effective=effective(spec),
        )
        with self._board.lock:
            if ctx.settings is settings:  # else apply_settings set the hash the new ones want
                self._board.desired_hash = spec.settings_hash
        existing = self._find_running()
        if existing is not None:
            self.adopt(existing, spec)
            self.watch_adopted(existing)
            return
        if not ctx.runtime.image_present(spec):
            self._pull(spec)
        if ctx.cancel.is_set():
            return
        spec = self._prepare(spec)
        self._launch_until_ready(spec)

    def refresh_desired_hash(self) -> None:
        """Work out the launch settings hash the current settings want (restart needed?)."""
        try:
            spec = self._spec_for(None)
        except (ApplianceError, SettingsError) as err:
            log.info("cannot compute the launch settings: %s", err)
            return
        self._board.want_settings(spec.settings_hash, spec.served_model_name)

    # ------------------------------------------------------------------------- before launch

    def _find_running(self) -> EngineHandle | None:
        runtime = self._ctx.runtime
        with EngineLock(self._ctx.timing.lock_timeout_s):
            handle = runtime.find(self._ctx.name())
            if handle is None:
                return None
            if runtime.inspect(handle).running:
                return handle
            runtime.remove(handle)  # an old, exited engine: its name is needed again
            return None

    def _pull(self, spec: LaunchSpec) -> None:
        board = self._board
        record = board.begin_pre_phase(PULLING)
        board.update(
            state=EngineState.PULLING_IMAGE, message=f"Pulling {spec.image}.", progress=(0, 0)
        )

        def on_progress(done: int, total: int, line: str) -> None:
            if self._ctx.cancel.is_set():
                raise EngineError("Start cancelled while pulling the image.")
            record.detail = fmt_progress(done, total)
            board.update(progress=(done, total), message=line or f"Pulling {spec.image}.")

        self._ctx.runtime.ensure_image(spec, on_progress)
        board.end_pre_phase(record)

    def _prepare(self, spec: LaunchSpec) -> LaunchSpec:
        """The engine's flags checked, the weights fetched, the chat template's notes."""
        if not self._demo:  # flags the engine does not know: dropped (known no-ops) or refused
            self._board.update(message="Checking the engine's flags (once per image).")
            flags = compat.check_flags(spec, self._ctx.runtime)
            spec = dataclasses.replace(spec, args=flags.args)
            self._board.update(notes=list(flags.notes), effective=effective(spec))
        spec = self._ensure_weights(spec)
        if template_notes := compat.template_notes(spec):
            self._board.update(notes=[*self._board.snapshot().notes, *template_notes])
        return spec

    def _ensure_weights(self, spec: LaunchSpec) -> LaunchSpec:
        if not spec.weights_repo:
            if spec.model.startswith("/"):  # a local checkpoint: never reach the Hub
                return spec.with_env(HF_HUB_OFFLINE="1")
            return spec
        board = self._board
        record = board.begin_pre_phase(DOWNLOADING)
        board.update(
            state=EngineState.DOWNLOADING_WEIGHTS,
            message=f"Downloading {spec.weights_repo}.",
            progress=(0, 0),
        )

        def on_progress(done: int, total: int, line: str) -> None:
            record.detail = fmt_progress(done, total)
            board.update(progress=(done, total), message=line or record.detail)

        fetch = self._weights_fetcher
        if fetch is None:
            from appliance.engine.weights import ensure_weights

            fetch = ensure_weights
        fetch(
            spec.weights_repo,
            hf_cache=spec.hf_cache,
            token=spec.hf_token,
            on_progress=on_progress,
            cancel=self._ctx.cancel,
        )
        board.end_pre_phase(record)
        return spec.with_env(HF_HUB_OFFLINE="1")

    # ---------------------------------------------------------------------- launch and retry

    def _launch_until_ready(self, spec: LaunchSpec) -> None:
        """Launch, wait for ready (then monitor), and retry once with safer settings when the
        engine ran out of memory."""
        ctx = self._ctx
        retried = False
        while not ctx.cancel.is_set():
            handle = self._launch(spec)
            if handle is None:  # cancelled, or adopted one another process started
                return
            outcome = self.wait_until_ready(
                handle, ctx.clock() + ctx.settings.engine.start_timeout_s
            )
            if outcome.ready:
                self.mark_ready(adopted=False)
                self._monitor.watch(handle)
                return
            if outcome.cancelled:
                return
            safer = None
            if not retried and outcome.failure in RETRYABLE:
                safer = self._safer(spec, outcome.failure or "")
            if safer is None:
                if retried and outcome.failure in RETRYABLE:
                    outcome.message += f" It failed again after a retry with {self._retry_note()}."
                self._fail(handle, outcome)
                return
            spec, note = safer
            retried = True
            self._remove_quietly(handle)
            self._board.update(
                retry_note=note,
                message=f"{_RETRY_REASON.get(outcome.failure or '', 'Failed')} at start; "
                f"retrying once with {note}.",
                effective={**effective(spec), "retry": note},
            )

    def _launch(self, spec: LaunchSpec) -> EngineHandle | None:
        ctx = self._ctx
        if spec.socket_dir:
            endpoint.prepare_socket(spec.name)
        else:
            health.ensure_port_free(spec.host_ip, spec.host_port)
        adopted: EngineHandle | None = None
        with EngineLock(ctx.timing.lock_timeout_s):
            if ctx.cancel.is_set():
                return None
            existing = ctx.runtime.find(spec.name)
            if existing is not None:
                if ctx.runtime.inspect(existing).running:
                    self.adopt(existing, spec)
                    adopted = existing
                else:
                    ctx.runtime.remove(existing)
            if adopted is None:
                if spec.socket_dir:  # no engine of this name runs: a socket file left is stale
                    endpoint.remove_socket(spec.name)
                self._board.update(
                    state=EngineState.STARTING,
                    progress=None,
                    message="Starting the engine.",
                    exit_code=None,
                )
                spec = with_fresh_engine_key(spec)  # a new key for every start, before it runs
                self.engine_key = spec.engine_key
                handle = ctx.runtime.launch(spec)
        if adopted is not None:  # watched outside the lock: the watch lasts the engine's life
            self.watch_adopted(adopted)
            return None
        self._logs.follow(handle, spec, fresh=True)
        self._board.update(container_id=handle.id, message="Loading the model.")
        return handle

    def _safer(self, spec: LaunchSpec, failure: str) -> tuple[LaunchSpec, str] | None:
        """The one safer retry: when vLLM's start-up check found less free memory than
        `--gpu-memory-utilization` asks for (another program holds memory), ask for what was free
        minus a margin; otherwise `spec.safer_spec` (lower utilization, or shorter context)."""
        with self._board.lock:
            engine = self._board.engine
            line = engine.tracker.failure_line if engine else ""
            facts: dict[str, Any] = dict(engine.tracker.facts) if engine else {}
        match = _FREE_MEMORY.search(line) if failure == phases.MEMORY_IN_USE else None
        if match is None:
            return safer_spec(spec, failure, facts)
        free, total = float(match.group(1)), float(match.group(2))
        current = spec.arg_value("--gpu-memory-utilization")
        was = float(current) if current else VLLM_DEFAULT_GPU_MEMORY_UTILIZATION
        fits = int((free / total - _FREE_MARGIN) * 100) / 100 if total > 0 else 0.0
        if fits >= was or fits < 0.1:
            return None
        note = (
            f"--gpu-memory-utilization {fits:.2f} (was {was:.2f}; "
            f"{free:.1f} of {total:.1f} GiB free)"
        )
        return spec.with_arg("--gpu-memory-utilization", f"{fits:.2f}"), note

    def _retry_note(self) -> str:
        with self._board.lock:
            return self._board.status.retry_note

    def _remove_quietly(self, handle: EngineHandle) -> None:
        with EngineLock(self._ctx.timing.lock_timeout_s):
            self._ctx.runtime.stop(handle, 5.0)
            self._ctx.runtime.remove(handle)

    # ----------------------------------------------------------------------- wait for ready

    def wait_until_ready(self, handle: EngineHandle, deadline: float) -> Outcome:
        """Poll until ready, exited, cancelled or past the deadline."""
        ctx = self._ctx
        url = ctx.url()
        while True:
            if ctx.cancel.is_set():
                return Outcome(cancelled=True)
            try:
                info = ctx.runtime.inspect(handle)
            except DockerUnavailableError as err:
                self._board.update(message=f"{err} Waiting for Docker to come back.")
                info = EngineExit(running=True)
            if not info.running:
                self._logs.wait_drained()
                return exited_outcome(self._board, info, starting=True)
            code = health.probe_health(url)
            if code == 200:
                return Outcome(ready=True)
            if code == 503:
                return Outcome(
                    message="The engine reported itself dead (/health 503) while starting."
                )
            if ctx.clock() >= deadline:
                return self._hang_outcome(handle)
            ctx.nap(ctx.timing.poll_interval_s)

    def _hang_outcome(self, handle: EngineHandle) -> Outcome:
        phase = phase_name(self._board.snapshot())
        engine = self._ctx.settings.engine
        limit = engine.start_timeout_s
        self._board.update(message=f"Not ready after {limit} s; stopping the engine.")
        self._ctx.runtime.stop(handle, engine.stop_timeout_s)
        return Outcome(
            message=f"The engine was not ready after {limit} s (stuck in '{phase}') and was "
            "stopped. See `step-station logs`; if the machine is just slow, raise "
            "engine.start_timeout_s (`step-station config set engine.start_timeout_s SECONDS`)."
        )

    def _fail(self, handle: EngineHandle, outcome: Outcome) -> None:
        fail_engine(self._ctx, self._board, self._logs, handle, outcome)

    # ------------------------------------------------------------------------ adopt / ready

    def adopt(self, handle: EngineHandle, spec: LaunchSpec | None) -> None:
        """Take a running engine as ours: its key, its labels, its log."""
        board = self._board
        labels = handle.labels
        key = engine_key.recover(handle.name, labels)
        self.engine_key = key or ""
        if key is None:  # vLLM will refuse the appliance's requests on /v1 (401)
            log.warning("the running engine's key file is gone; restart the engine to use it")
            board.update(notes=[*board.snapshot().notes, KEY_LOST_NOTE])
        board.update(
            state=EngineState.STARTING,
            container_id=handle.id,
            profile=labels.get(LABEL_PROFILE, spec.profile if spec else ""),
            served_model_name=labels.get(LABEL_SERVED_NAME, spec.served_model_name if spec else ""),
            started_at=handle.started_at,
            message="Found a running engine; watching it.",
            progress=None,
        )
        self._logs.follow(handle, spec, fresh=False)
        board.update_restart_needed()

    def watch_adopted(self, handle: EngineHandle) -> None:
        """Wait for an adopted engine to be ready (if it is not yet), then monitor it."""
        ctx = self._ctx
        if self._board.state != EngineState.READY:
            started = handle.started_at or ctx.wall()
            remaining = ctx.settings.engine.start_timeout_s - (ctx.wall() - started)
            outcome = self.wait_until_ready(handle, ctx.clock() + max(remaining, 5.0))
            if outcome.cancelled:
                return
            if not outcome.ready:
                self._fail(handle, outcome)
                return
            self.mark_ready(adopted=True)
        self._monitor.watch(handle)

    def mark_ready(self, *, adopted: bool) -> None:
        self._logs.catch_up()
        board = self._board
        now = self._ctx.wall()
        with board.lock:
            if board.engine is not None:
                board.engine.tracker.close(now)
            board.status.ready_at = now
            msg = "Serving (adopted a running engine)." if adopted else "Serving."
            if board.status.retry_note:
                msg += f" Started after one retry with {board.status.retry_note}."
        state = EngineState.READY
        if adopted and self._ctx.settings.engine.sleep_mode and health.is_sleeping(self._ctx.url()):
            state, msg = EngineState.SLEEPING, "Sleeping (adopted a sleeping engine)."
        board.update(state=state, progress=None, message=msg)
        board.update_restart_needed()
        self._sleeper.note_activity()


# ------------------------------------------------------------------------------- helpers


def effective(spec: LaunchSpec) -> dict[str, Any]:
    """What the status shows of the launch: the served name, the model, the memory asked for."""
    max_len = spec.arg_value("--max-model-len")
    util = spec.arg_value("--gpu-memory-utilization")
    return {
        "served_model_name": spec.served_model_name,
        "model": spec.model,
        "image": spec.image,
        "profile": spec.profile,
        "max_model_len": int(max_len) if max_len and max_len.isdigit() else None,
        "gpu_memory_utilization": float(util) if util else None,
        "gpus": list(spec.gpus) if spec.gpus is not None else None,
        "command": spec.display_command(),
    }
