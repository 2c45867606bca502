"""`step-station doctor [--json]`: pass / warn / fail per check, with the command that fixes it."""

from __future__ import annotations

import argparse
import json
from typing import Any

from appliance import doctor
from appliance import settings as st

_MARK = {doctor.PASS: "ok  ", doctor.WARN: "warn", doctor.FAIL: "FAIL"}


def register(sub: Any) -> None:
    parser = sub.add_parser(
        "doctor",
        help="check Docker, the NVIDIA runtime, GPUs, disk, ports and the HF token",
        description="Check that this machine can start the engine. Exits non-zero when a "
        "failed check would stop a start.",
    )
    parser.add_argument("--json", action="store_true", help="one JSON object, for scripts")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    loaded = st.load_settings()
    report = doctor.run_doctor(
        loaded.settings, hf_token=st.hf_token(), settings_warnings=loaded.warnings
    )
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(render(report))
    return 0 if report.ok else 1


def render(report: doctor.Report) -> str:
    lines: list[str] = []
    for check in report.checks:
        lines.append(f"[{_MARK[check.status]}] {check.name:<15} {check.detail}")
        if check.fix and check.status != doctor.PASS:
            lines.append(f"       {'':<15} fix: {check.fix}")
    failed = [c.name for c in report.checks if c.status == doctor.FAIL]
    lines.append("")
    lines.append(
        "Ready to start." if not failed else f"Not ready: {', '.join(failed)} would stop a start."
    )
    return "\n".join(lines)
