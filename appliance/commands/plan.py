"""`step-station plan [--hardware PRESET] [--json] [--print-command PROFILE]`."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from appliance import hardware, planner, profiles
from appliance import settings as st
from appliance.errors import SettingsError
from appliance.hardware import GB, Hardware
from appliance.units import fmt_bytes


def register(sub: Any) -> None:
    parser = sub.add_parser(
        "plan",
        help="which launch profiles fit this machine (or a preset), with the numbers",
        description="Fit Step-3.7-Flash's launch profiles to the detected GPUs or a preset "
        "and show which one the appliance would run.",
    )
    parser.add_argument(
        "--hardware",
        choices=sorted(hardware.PRESETS),
        help="plan for a preset machine instead of this one",
    )
    parser.add_argument("--json", action="store_true", help="one JSON object, for scripts")
    parser.add_argument(
        "--concurrent",
        type=int,
        default=planner.DEFAULT_CONCURRENT,
        metavar="N",
        help="concurrent requests for the per-request context column (default %(default)s)",
    )
    parser.add_argument(
        "--print-command",
        metavar="PROFILE",
        help="print the `vllm serve` line and the equivalent `docker run` for PROFILE "
        f"({', '.join(profiles.PROFILES)})",
    )
    parser.set_defaults(func=_run)


def _load_engine() -> st.EngineSettings:
    result = st.load_settings()
    for warning in result.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    return result.settings.engine


def _hardware(preset: str | None) -> Hardware:
    return hardware.PRESETS[preset] if preset else hardware.detect()


def _run(args: argparse.Namespace) -> int:
    engine = _load_engine()
    if args.concurrent < 1:
        raise SettingsError(
            f"--concurrent must be at least 1, got {args.concurrent}.", hint="Use e.g. 4."
        )
    if args.print_command:
        profile = profiles.get_profile(args.print_command)
        fit = planner.fit_profile(profile, _hardware(args.hardware), engine)
        # Only real UUIDs go into a command someone may run; presets have made-up ones.
        uuids = fit.gpu_uuids if not args.hardware else []
        if not fit.fits:
            why = "; ".join(fit.reasons)
            print(f"note: {profile.name} does not fit {fit_target(args)}: {why}", file=sys.stderr)
        vllm = ["vllm", "serve", *profiles.build_vllm_args(profile, engine)]
        print(profiles.format_command(vllm))
        print(profiles.format_command(profiles.docker_run_command(profile, engine, uuids)))
        return 0
    result = planner.plan(
        _hardware(args.hardware), profiles.PROFILES, engine, concurrent=args.concurrent
    )
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        print(render(result))
    return 0


def fit_target(args: argparse.Namespace) -> str:
    return f"the {args.hardware} preset" if args.hardware else "this machine"


def _notes(fit: planner.ProfileFit) -> str:
    if fit.reasons:
        return "; ".join(fit.reasons)
    if fit.mtp:
        return "MTP-3 on"
    if profiles.get_profile(fit.name).supports_mtp:
        return "MTP-3 available (config set engine.mtp true)"
    return "no MTP weights"


def _num(value: int | None) -> str:
    return "-" if value is None else f"{value:,}"


def render(result: planner.Plan) -> str:
    """The plan as a readable table."""
    hw = result.hardware
    lines = [f"Hardware ({hw.source}): {hw.describe()}"]
    if hw.driver_version:
        lines[0] += f", driver {hw.driver_version}"
    host = hw.host
    lines.append(
        f"Host: {host.cpu_count} CPUs, {fmt_bytes(host.memory_total_bytes)} memory"
        + (f" ({host.note})" if host.note else "")
    )
    for gpu in planner.rank_gpus(hw.gpus):
        lines.append(f"  GPU {gpu.index}: {gpu.uuid}  {gpu.describe()}")
    n = result.profiles[0].n_concurrent if result.profiles else planner.DEFAULT_CONCURRENT
    w = max([10, *(len(fit.name) for fit in result.profiles)])  # `-dpN` names are longer
    header = (
        f"{'profile':<{w}} {'fits':<4} {'weights':>9} {'KV budget':>10} {'KV tokens':>11} "
        f"{'max ctx':>8} {f'ctx@{n}':>8}  notes"
    )
    lines += ["", header, "-" * len(header)]
    for fit in result.profiles:
        budget = "-" if fit.kv_budget_gb is None else fmt_bytes(fit.kv_budget_gb * GB)
        lines.append(
            f"{fit.name:<{w}} {'yes' if fit.fits else 'no':<4} {fmt_bytes(fit.weights_gb * GB):>9} "
            f"{budget:>10} {_num(fit.kv_tokens):>11} {_num(fit.max_context):>8} "
            f"{_num(fit.max_context_at_n):>8}  " + _notes(fit)
        )
    lines.append("")
    lines.append(f"Chosen: {result.chosen or 'none'} ({result.chosen_reason})")
    chosen = result.chosen_fit
    if chosen is not None:
        lines.append(
            f"  {_num(chosen.requests_at_context)} request(s) of {chosen.context:,} tokens fit at "
            f"once; GPU(s) {', '.join(chosen.gpu_uuids)}"
        )
    lines.append("Assumptions:")
    lines += [f"  - {line}" for line in result.assumptions]
    return "\n".join(line.rstrip() for line in lines)
