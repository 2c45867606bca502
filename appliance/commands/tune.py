"""`step-station tune-moe`: vLLM's MoE kernel tuner for Step-3.7's expert shape on this GPU.

    step-station tune-moe [--dtype fp8|nvfp4] [--batch-sizes B ...] [--yes] [--json]
    step-station tune-moe --status [--json]

The engine is stopped for the whole run (the tuner needs the GPU), which takes hours: the command
says so with its estimate and asks before stopping anything, unless --yes. The result is
installed into the tuned-config folder every later engine start mounts (docs/moe-tuning.md).
Exit 0 when a config was installed, 130 when cancelled (Ctrl-C; nothing installed), else the
error's code. While the service runs, the tuning is the service's (one at a time, beside its
benchmark runner); without it, this command runs it here.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
from collections.abc import Callable
from typing import Any

from appliance import settings as st
from appliance.bench import tune
from appliance.bench.errors import TunedConfigError
from appliance.bench.tuning import DTYPES, TuneOutcome, TuneRequest, TuneRunner, TuneState
from appliance.bench.tuning import stop_message as tuning_stop_message
from appliance.control import (
    ServiceTune,
    running_service,
    tune_launcher_for,
    tune_target,
    tuned_configs,
)

CANCEL_WAIT_S = 60.0


def register(sub: Any) -> None:
    parser = sub.add_parser(
        "tune-moe",
        help="tune vLLM's MoE kernels for this GPU (stops the engine for hours)",
        description="Run vLLM's MoE tuner for Step-3.7's expert shape on the engine's GPU and "
        "install the result where every later engine start finds it.",
    )
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp8")
    parser.add_argument(
        "--batch-sizes",
        type=int,
        nargs="+",
        metavar="B",
        help="token counts to tune (default: the tuner's own 18, 1 to 4096)",
    )
    parser.add_argument("--yes", action="store_true", help="stop the engine without asking")
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    parser.add_argument("--status", action="store_true", help="which tuned configs exist")
    parser.set_defaults(func=_tune_moe)


def _tune_moe(args: argparse.Namespace) -> int:
    service = running_service()
    remote = service.tune() if service is not None else None
    if args.status:
        return _status(remote, args)
    request = TuneRequest(
        dtype=args.dtype, batch_sizes=tuple(args.batch_sizes or tune.DEFAULT_BATCH_SIZES)
    )
    if remote is not None:
        gpu = str((remote.status().get("configs") or {}).get("gpu_name") or "")
        _confirm(tuning_stop_message(len(set(request.batch_sizes)), gpu), args)
        outcome = _run_cancellable(lambda show: remote.run(request, show), remote.cancel, args)
    else:
        outcome = _run_here(request, args)
    if not outcome.completed:
        print("Tuning cancelled; nothing was installed.", file=sys.stderr)
        return 130
    if args.json:
        print(json.dumps(outcome.to_dict()))
    else:
        print(
            f"Installed {outcome.path} ({len(outcome.batch_sizes)} batch sizes, "
            f"{outcome.elapsed_s / 60:.0f} min)."
        )
        if outcome.note:
            print(outcome.note)
    return 0


def _run_here(request: TuneRequest, args: argparse.Namespace) -> TuneOutcome:
    """No service: a supervisor here stops the engine, and the tuner runs from this process."""
    from appliance.engine import Supervisor

    settings = st.load_settings().settings
    sup = Supervisor(settings, secrets=st.load_secrets(), outside_poll_s=0)
    try:
        sup.attach()
        target = tune_target(sup, settings)
        _confirm(tuning_stop_message(len(set(request.batch_sizes)), target.gpu_name), args)
        runner = TuneRunner(launcher_for=tune_launcher_for(sup.runtime))
        return _run_cancellable(
            lambda show: runner.run(request, target, lambda message: sup.stop(), show),
            runner.cancel,
            args,
        )
    finally:
        sup.close()


def _confirm(message: str, args: argparse.Namespace) -> None:
    """Say what stopping costs and ask, before anything stops (--yes answers for scripts)."""
    print(message, file=sys.stderr)
    if args.yes:
        return
    if not sys.stdin.isatty():
        raise TunedConfigError(
            "Tuning stops the engine for hours and nobody is here to confirm it.",
            hint="Pass --yes to tune without asking.",
        )
    answer = input("Stop the engine and tune now? [y/N] ").strip().lower()
    if answer not in ("y", "yes"):
        raise TunedConfigError("Tuning not started; the engine was left as it was.")


def _run_cancellable(
    run: Callable[[Callable[[TuneState], None]], TuneOutcome],
    cancel: Callable[[], bool],
    args: argparse.Namespace,
) -> TuneOutcome:
    """Run in a worker thread so that Ctrl-C here cancels the tuning (and waits for the tuner
    to stop) instead of leaving it to run unseen."""
    done: list[TuneOutcome] = []
    failed: list[BaseException] = []
    last: list[str] = [""]

    def show(state: TuneState) -> None:
        line = progress_line(state)
        if line != last[0] and not (args.json and not sys.stderr.isatty()):
            print(line, file=sys.stderr, flush=True)
        last[0] = line

    def work() -> None:
        try:
            done.append(run(show))
        except BaseException as err:  # noqa: BLE001 - handed to the main thread, re-raised there
            failed.append(err)

    worker = threading.Thread(target=work, name="tune", daemon=True)
    worker.start()
    try:
        while worker.is_alive():
            worker.join(0.2)
    except KeyboardInterrupt:
        print("Cancelling the tuning...", file=sys.stderr)
        cancel()
        worker.join(CANCEL_WAIT_S)
        if failed or not done:
            return TuneOutcome(state="cancelled")
    if failed:
        raise failed[0]
    return done[0]


def progress_line(state: TuneState) -> str:
    """One line: batch sizes done, the chunk, the time so far and, once measured, left."""
    if not state.chunk:
        return state.message
    left = f", about {state.remaining_s / 60:.0f} min left" if state.remaining_s else ""
    return (
        f"Tuning: {state.done}/{state.total} batch sizes (run {state.chunk}/{state.chunks}), "
        f"{state.elapsed_s / 60:.0f} min{left}"
    )


def _status(remote: ServiceTune | None, args: argparse.Namespace) -> int:
    if remote is not None:
        data = remote.status()
    else:
        from appliance.engine import Supervisor

        settings = st.load_settings().settings
        sup = Supervisor(settings, outside_poll_s=0)
        try:
            data = {"running": None, "configs": tuned_configs(tune.default_folder(), sup, settings)}
        finally:
            sup.close()
    if args.json:
        print(json.dumps(data, default=str))
        return 0
    configs = data["configs"]
    expected = configs.get("expected")
    if expected is None:
        print(f"Cannot tell which file this GPU needs: {configs.get('note')}")
    elif expected["usable"]:
        print(f"Tuned: {expected['file_name']} ({len(expected['batch_sizes'])} batch sizes).")
    elif expected["exists"]:
        print(f"Broken: {expected['file_name']}: {'; '.join(expected['problems'][:3])}")
    else:
        print(f"Not tuned: no {expected['file_name']} in {configs['folder']}.")
    if data.get("running"):
        print(progress_line(TuneState(**data["running"])))
    return 0
