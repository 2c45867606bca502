"""`step-station pull | start | stop | restart | status | logs`: the engine from the terminal.

While the service (`step-station up`) runs, `start`, `stop`, `restart`, `status`, `logs` and
`pull` go to its supervisor over its private control socket (appliance/control.py): one owner of
the engine, and the terminal sees what the pages see. Without a service, each command runs a
supervisor of its own; the inter-process lock and the engine's Docker labels keep it in step with
an appliance started later (which adopts what the CLI started).
Progress: a bar redrawn in place on a terminal, plain lines otherwise.

Exit codes (`status`): 0 ready or sleeping, 10 not running (absent/stopped), 11 in progress
(pulling, downloading, starting, stopping), 6 failed. Other commands: 0 on success, else the
error's code (3 Docker unreachable, 4 pull failed, 5 weights, 6 engine, 7 port in use).
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, TextIO

from appliance import endpoint
from appliance import settings as st
from appliance.control import (
    NO_IMAGE,
    EngineCommands,
    PullOutcome,
    ServiceSupervisor,
    pull_image,
    running_service,
    service_supervisor,
    status_from_dict,
)
from appliance.engine import EngineState, EngineStatus, Supervisor
from appliance.errors import EngineError
from appliance.units import fmt_bytes, fmt_progress

EXIT_NOT_RUNNING = 10
EXIT_IN_PROGRESS = 11
EXIT_FAILED = EngineError.exit_code


def register(sub: Any) -> None:
    demo = argparse.ArgumentParser(add_help=False)
    demo.add_argument(
        "--demo", action="store_true", help="the simulator as a local process (no GPU, no Docker)"
    )
    pull = sub.add_parser("pull", help="pull the engine image (progress per byte)")
    pull.set_defaults(func=_pull)

    start = sub.add_parser("start", parents=[demo], help="start the engine")
    start.add_argument("--profile", help="launch profile (default: engine.profile)")
    wait = start.add_mutually_exclusive_group()
    wait.add_argument("--wait", dest="wait", action="store_true", default=True, help="(default)")
    wait.add_argument(
        "--no-wait", dest="wait", action="store_false", help="return once the engine is launched"
    )
    start.add_argument("--timeout", type=float, default=None, help="seconds to wait for ready")
    start.set_defaults(func=_start)

    stop = sub.add_parser("stop", parents=[demo], help="stop the engine and free the GPU")
    stop.set_defaults(func=_stop)

    restart = sub.add_parser("restart", parents=[demo], help="stop, then start with the settings")
    restart.add_argument("--profile")
    restart.set_defaults(func=_restart, wait=True, timeout=None)

    status = sub.add_parser("status", parents=[demo], help="where the engine is")
    status.add_argument("--json", action="store_true", help="one JSON object")
    status.set_defaults(func=_status)

    logs = sub.add_parser("logs", parents=[demo], help="the engine's log")
    logs.add_argument("-f", "--follow", action="store_true", help="keep printing new lines")
    logs.set_defaults(func=_logs)


def _settings() -> st.Settings:
    result = st.load_settings()
    for warning in result.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    return result.settings


def _supervisor(args: argparse.Namespace) -> EngineCommands:
    """The running service's supervisor when a service answers, else one of this process."""
    settings = _settings()
    service = service_supervisor(settings)
    if service is not None:
        return service
    if getattr(args, "demo", False):
        return Supervisor.for_demo(settings, outside_poll_s=0)
    return Supervisor(settings, secrets=st.load_secrets(), outside_poll_s=0)


# ----------------------------------------------------------------------------------- output


class Progress:
    """A one-line bar on a terminal; plain lines (on change, every 10%) otherwise."""

    def __init__(self, out: TextIO | None = None) -> None:
        self.out = out or sys.stdout
        self.tty = self.out.isatty()
        self._last_line = ""
        self._last_decile: dict[str, int] = {}
        self._printed: list[str] = []

    def show(self, status: EngineStatus) -> None:
        label = status.phase or status.state.label
        frac = status.progress_fraction
        if self.tty:
            self._bar(label, status, frac)
            return
        # plain lines: every phase once, in order (even one shorter than a poll), then progress
        # at each 10% while bytes move
        names = [p.name for p in status.phases]
        if status.state != EngineState.STARTING or not names:
            names.append(label)
        for name in names:
            if name not in self._printed:
                self._printed.append(name)
                print(name, file=self.out, flush=True)
        if frac is not None and status.progress:
            decile = int(frac * 10)
            if decile > self._last_decile.get(label, -1):
                self._last_decile[label] = decile
                done, total = status.progress
                print(f"{label}: {fmt_progress(done, total)}", file=self.out)

    def _bar(self, label: str, status: EngineStatus, frac: float | None) -> None:
        elapsed = ""
        open_phases = [p for p in status.phases if not p.done]
        if open_phases:
            elapsed = f" {open_phases[-1].elapsed_s:5.1f} s"
            if open_phases[-1].detail:
                elapsed += f" ({open_phases[-1].detail})"
        if frac is not None and status.progress:
            width = 30
            filled = int(width * frac)
            bar = "#" * filled + "-" * (width - filled)
            text = f"{label} [{bar}] {100 * frac:3.0f}% {fmt_bytes(status.progress[0])}/"
            text += fmt_bytes(status.progress[1])
        else:
            text = f"{label}{elapsed}"
        self.out.write("\r\x1b[2K" + text[:120])
        self.out.flush()
        self._last_line = text

    def done(self) -> None:
        if self.tty and self._last_line:
            self.out.write("\n")
            self.out.flush()


def _follow(sup: EngineCommands, until: Any, timeout_s: float) -> EngineStatus:
    """Show progress until `until(status)` is true or the timeout passes."""
    progress = Progress()
    deadline = time.monotonic() + timeout_s
    status = sup.status()
    try:
        while not until(status) and time.monotonic() < deadline:
            progress.show(status)
            status = sup.wait_for_change(status.version, min(0.5, timeout_s))
        progress.show(status)
    finally:
        progress.done()
    return status


def _summary(status: EngineStatus) -> None:
    for phase in status.phases:
        detail = f"  {phase.detail}" if phase.detail else ""
        print(f"  {phase.name:<24} {phase.elapsed_s:8.1f} s{detail}")


# --------------------------------------------------------------------------------- commands


def _pull(args: argparse.Namespace) -> int:
    del args
    image = _settings().engine.image
    progress = Progress()
    shown = EngineStatus(state=EngineState.PULLING_IMAGE, phase=f"Pulling {image}")

    def on_progress(done: int, total: int) -> None:
        shown.progress = (done, total)
        progress.show(shown)

    service = running_service()  # the service's runtime pulls, as it would for a start
    try:
        outcome = service.pull(on_progress) if service is not None else _pull_here(on_progress)
    finally:
        progress.done()
    if outcome.skipped:
        print(outcome.skipped)
        return 0
    print(f"Pulled {outcome.image} ({fmt_bytes(outcome.total)} downloaded).")
    return 0


def _pull_here(on_progress: Callable[[int, int], None]) -> PullOutcome:
    settings = _settings()
    runtime = Supervisor(settings, outside_poll_s=0).runtime
    if runtime.kind != "docker":
        return PullOutcome(skipped=NO_IMAGE)
    image = settings.engine.image
    return PullOutcome(image, pull_image(runtime, image, on_progress))


def _start(args: argparse.Namespace) -> int:
    sup = _supervisor(args)
    try:
        sup.attach()
        status = sup.start(args.profile)
        timeout = args.timeout or float(sup.settings.engine.start_timeout_s + 600)
        if not args.wait:
            status = _follow(
                sup, lambda s: bool(s.container_id) or not s.state.busy, timeout_s=timeout
            )
        else:
            status = _follow(sup, lambda s: not s.state.busy, timeout_s=timeout)
        return _report_start(status, waited=args.wait)
    finally:
        sup.close()


def _report_start(status: EngineStatus, *, waited: bool) -> int:
    for note in status.notes:
        print(f"Note: {note}", file=sys.stderr)
    if status.state == EngineState.FAILED:
        print(f"step-station: {status.message}", file=sys.stderr)
        for line in status.log_tail[-10:]:
            print(f"  | {line}", file=sys.stderr)
        return EXIT_FAILED
    if status.state in (EngineState.READY, EngineState.SLEEPING):
        _summary(status)
        print(
            f"Ready: {endpoint.describe(status.engine_url)} serves "
            f"{status.served_model_name!r}. {status.message}"
        )
        if status.restart_needed:
            print("Note: settings changed since it started; `step-station restart` applies them.")
        return 0
    if not waited and status.container_id:
        print(
            f"Engine launched ({status.container_id[:12]}); `step-station status` shows progress."
        )
        return 0
    print(f"step-station: the engine is {status.state.value}: {status.message}", file=sys.stderr)
    return EXIT_IN_PROGRESS if status.state.busy else EXIT_NOT_RUNNING


def _stop(args: argparse.Namespace) -> int:
    sup = _supervisor(args)
    try:
        began = time.monotonic()
        before = sup.attach()
        status = sup.stop()
        if before.state in (EngineState.ABSENT,) and status.state == EngineState.ABSENT:
            print("The engine is not running.")
        else:
            print(f"{status.message} ({time.monotonic() - began:.1f} s)")
        return 0
    finally:
        sup.close()


def _restart(args: argparse.Namespace) -> int:
    sup = _supervisor(args)
    try:
        sup.attach()
        sup.stop()
        sup.start(args.profile)
        timeout = float(sup.settings.engine.start_timeout_s + 600)
        status = _follow(sup, lambda s: not s.state.busy, timeout_s=timeout)
        return _report_start(status, waited=True)
    finally:
        sup.close()


def _status(args: argparse.Namespace) -> int:
    sup = _supervisor(args)
    try:
        if isinstance(sup, ServiceSupervisor):  # the service's own view, GPUs and host included
            full = sup.full_status()
            status = status_from_dict(full["json"])
            data, lines = full["json"], list(full.get("lines") or [])
        else:
            from appliance.monitoring.status import status_report

            status = sup.attach()
            local = sup if isinstance(sup, Supervisor) else None  # it is: no service answered
            data, lines = status_report(status, sup.settings, local)
        if args.json:
            print(json.dumps(data, indent=2, default=str))
        else:
            _print_status(status)
            for line in lines:
                print(line)
    finally:
        sup.close()
    if status.state in (EngineState.READY, EngineState.SLEEPING):
        return 0
    if status.state == EngineState.FAILED:
        return EXIT_FAILED
    return EXIT_IN_PROGRESS if status.state.busy else EXIT_NOT_RUNNING


def _print_status(status: EngineStatus) -> None:
    phase = f" ({status.phase})" if status.phase and status.phase != status.state.label else ""
    print(f"Engine:  {status.state.label}{phase}")
    if status.profile:
        print(f"Profile: {status.profile}")
    if status.container_id:
        print(f"Engine id: {status.container_id[:12]}  ({status.container_name})")
    if status.state in (EngineState.READY, EngineState.SLEEPING):
        print(
            f"URL:     {endpoint.describe(status.engine_url)}  model {status.served_model_name!r}"
        )
        for key in ("max_model_len", "kv_cache_tokens"):
            if status.effective.get(key):
                print(f"{key}: {status.effective[key]:,}")
    if status.message:
        print(status.message)
    for note in status.notes:
        print(f"Note: {note}")
    if status.state == EngineState.FAILED:
        for line in status.log_tail[-10:]:
            print(f"  | {line}")


def _logs(args: argparse.Namespace) -> int:
    sup = _supervisor(args)
    stop = threading.Event()
    try:
        for line in sup.iter_logs(follow=args.follow, stop=stop):
            print(line, flush=args.follow)
    except KeyboardInterrupt:
        stop.set()
    finally:
        sup.close()
    return 0
