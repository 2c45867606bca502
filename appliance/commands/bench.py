"""`step-station bench`: vLLM's own `vllm bench serve` against the running engine, kept.

    step-station bench [--preset seed|chat|long|image] [--num-prompts N] [--random-input N]
                       [--random-output N] [--max-concurrency N] [--through-gateway] [--json]
    step-station bench --list [--json]

Scripts depend on this interface (issue 14). Exit 0 when the run completes; `--json` prints one
JSON object: vLLM's own result keys plus `profile` and `id`. Ctrl-C cancels the run (nothing is
kept) and exits 130. Errors exit with their code (12 for a benchmark's own; 10 and 11 stay
`status`'s).

While the service (`step-station up`) runs, the run is the service's (over its control socket):
one run at a time for the whole Station, and the dashboard shows it. Without a service this
command attaches to the engine itself, as `start` does, and runs the benchmark here.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from appliance import settings as st
from appliance.bench import presets
from appliance.bench.errors import BenchError
from appliance.bench.runner import BenchOutcome, BenchRequest, BenchRunner, BenchState
from appliance.bench.store import BenchStore, StoredRun
from appliance.control import ServiceBench, bench_target, launcher_for, running_service
from appliance.units import fmt_latency

# How long a cancelled run may take to stop before the command gives up on it.
CANCEL_WAIT_S = 30.0


def register(sub: Any) -> None:
    bench = sub.add_parser(
        "bench",
        help="benchmark the running engine with vLLM's own `vllm bench serve`",
        description="Run vLLM's benchmark against the running engine and keep the result.",
    )
    bench.add_argument(
        "--preset",
        choices=list(presets.PRESETS),
        default="seed",
        help="seed: the model card's line (default); chat: short prompts; long: one prompt "
        "near the window; image: one image per chat",
    )
    bench.add_argument("--num-prompts", type=int, metavar="N")
    bench.add_argument("--random-input", type=int, metavar="N", help="prompt tokens")
    bench.add_argument("--random-output", type=int, metavar="N", help="output tokens")
    bench.add_argument("--max-concurrency", type=int, metavar="N")
    bench.add_argument(
        "--through-gateway",
        action="store_true",
        help="through the LAN API (needs the service), to see what a client sees",
    )
    bench.add_argument("--json", action="store_true", help="one JSON object (a list with --list)")
    bench.add_argument("--list", action="store_true", help="the runs kept so far, newest first")
    bench.set_defaults(func=_bench)


def _bench(args: argparse.Namespace) -> int:
    if args.list:
        return _list(args)
    request = BenchRequest(
        preset=args.preset,
        num_prompts=args.num_prompts,
        random_input=args.random_input,
        random_output=args.random_output,
        max_concurrency=args.max_concurrency,
        through_gateway=args.through_gateway,
    )
    service = running_service()
    if service is not None:
        remote = service.bench()
        outcome = _run_cancellable(lambda show: remote.run(request, show), remote.cancel, args)
    else:
        outcome = _run_here(request, args)
    if not outcome.completed:
        print("Benchmark cancelled; nothing was kept.", file=sys.stderr)
        return 130
    if args.json:
        print(json.dumps(outcome.export(), default=str))
    else:
        _print_outcome(outcome)
    return 0


def _run_here(request: BenchRequest, args: argparse.Namespace) -> BenchOutcome:
    """No service: attach to the engine as `start` does, and run the benchmark in this process."""
    from appliance.engine import Supervisor

    if request.through_gateway:
        raise BenchError(
            "--through-gateway needs the running service (the gateway is part of it).",
            hint="Start it with `step-station up`, or run without --through-gateway.",
        )
    settings = _settings()
    sup = Supervisor(settings, secrets=st.load_secrets(), outside_poll_s=0)
    try:
        sup.attach()
        target = bench_target(sup, settings, _gpu_name(sup))
        runner = BenchRunner(launcher_for=launcher_for(sup.runtime))
        try:
            return _run_cancellable(
                lambda show: runner.run(request, target, show), runner.cancel, args
            )
        finally:
            runner.store.close()
    finally:
        sup.close()


def _run_cancellable(
    run: Callable[[Callable[[BenchState], None]], BenchOutcome],
    cancel: Callable[[], bool],
    args: argparse.Namespace,
) -> BenchOutcome:
    """Run in a worker thread so that Ctrl-C here cancels the run (and waits for it to stop)
    instead of leaving it to finish unseen."""
    shown = _Progress(quiet=args.json)
    done: list[BenchOutcome] = []
    failed: list[BaseException] = []

    def work() -> None:
        try:
            done.append(run(shown.show))
        except BaseException as err:  # noqa: BLE001 - handed to the main thread, re-raised there
            failed.append(err)

    worker = threading.Thread(target=work, name="bench", daemon=True)
    worker.start()
    try:
        while worker.is_alive():
            worker.join(0.2)
    except KeyboardInterrupt:
        shown.end()
        print("Cancelling the benchmark...", file=sys.stderr)
        cancel()
        worker.join(CANCEL_WAIT_S)
        if failed or not done:
            return BenchOutcome(state="cancelled")
    finally:
        shown.end()
    if failed:
        raise failed[0]
    return done[0]


def _settings() -> st.Settings:
    result = st.load_settings()
    for warning in result.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    return result.settings


def _gpu_name(sup: Any) -> str:
    """The engine's GPU, for the record ("" without NVML: a CPU engine, or no driver)."""
    from appliance import hardware

    uuids = list(sup.status().effective.get("gpus") or [])
    gpus = hardware.detect().gpus
    chosen = next((g for g in gpus if g.uuid in uuids), gpus[0] if gpus else None)
    return chosen.name if chosen is not None else ""


class _Progress:
    """Requests done / total and the time, on one line redrawn on a terminal (stderr: stdout
    stays the result's, for `--json` pipes)."""

    def __init__(self, *, quiet: bool) -> None:
        self.out = sys.stderr
        self.tty = self.out.isatty()
        self.quiet = quiet and not self.tty
        self._last = (-1, -1)
        self._drawn = False

    def show(self, state: BenchState) -> None:
        if self.quiet or (state.done, state.total) == self._last:
            return
        self._last = (state.done, state.total)
        text = (
            f"Benchmark {state.preset}: {state.done}/{state.total} requests, "
            f"{state.elapsed_s:.0f} s"
        )
        if self.tty:
            self.out.write("\r\x1b[2K" + text)
            self._drawn = True
        else:
            self.out.write(text + "\n")
        self.out.flush()

    def end(self) -> None:
        if self._drawn:
            self.out.write("\n")
            self.out.flush()
            self._drawn = False


# ----------------------------------------------------------------------------------- output


def _print_outcome(outcome: BenchOutcome) -> None:
    r = outcome.result
    print(f"Benchmark run {outcome.id} kept ({outcome.profile or 'no profile'}).")
    rows = [
        ("Successful requests", r.get("completed")),
        ("Duration", f"{float(r.get('duration') or 0):.1f} s"),
        ("Request throughput", f"{float(r.get('request_throughput') or 0):.2f} req/s"),
        ("Output throughput", f"{float(r.get('output_throughput') or 0):.1f} tok/s"),
    ]
    for metric in ("ttft", "tpot", "itl"):
        if f"mean_{metric}_ms" in r:
            values = [
                fmt_latency(float(r[f"{s}_{metric}_ms"]) / 1000)
                for s in ("mean", "median", "p99")
                if f"{s}_{metric}_ms" in r
            ]
            rows.append((f"{metric.upper()} mean/median/p99", " / ".join(values)))
    if "spec_decode_acceptance_rate" in r:
        rows.append(("MTP acceptance", f"{float(r['spec_decode_acceptance_rate']):.1f}%"))
    for label, value in rows:
        print(f"  {label:<26} {value}")


def _list(args: argparse.Namespace) -> int:
    service = running_service()
    if service is not None:
        runs = ServiceBench(service).list_runs()
    else:
        with BenchStore() as store:
            runs = store.list_runs()
    if args.json:
        print(json.dumps([run.as_export() for run in runs], default=str))
        return 0
    if not runs:
        print("No benchmark runs kept yet; `step-station bench` runs one.")
        return 0
    print(
        f"{'id':>4}  {'date (UTC)':<16}  {'profile':<12} {'preset':<7} {'prompts':>7} "
        f"{'req/s':>7} {'out tok/s':>9} {'TTFT mean':>10} {'TPOT mean':>10}"
    )
    for run in runs:
        print(_run_line(run))
    return 0


def _run_line(run: StoredRun) -> str:
    r = run.raw
    when = time.strftime("%Y-%m-%d %H:%M", time.gmtime(run.created_at))

    def ms(key: str) -> str:
        return fmt_latency(float(r[key]) / 1000) if key in r else "n/a"

    return (
        f"{run.id:>4}  {when:<16}  {run.info.profile:<12} {run.info.preset:<7} "
        f"{r.get('completed', 0):>7} {float(r.get('request_throughput') or 0):>7.2f} "
        f"{float(r.get('output_throughput') or 0):>9.1f} {ms('mean_ttft_ms'):>10} "
        f"{ms('mean_tpot_ms'):>10}"
    )
