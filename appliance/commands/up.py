"""`step-station up`: run the appliance (UI, engine supervisor, gateway) until Ctrl-C / SIGTERM."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from appliance.errors import SettingsError
from appliance.settings import load_settings, with_changes


def register(sub: Any) -> None:
    parser = sub.add_parser(
        "up",
        help="run the appliance: browser UI, engine manager and API",
        description="Run Step Station in the foreground. The UI listens on ui.host:ui.port "
        "(http://127.0.0.1:7860 by default).",
    )
    parser.add_argument(
        "--demo",
        action="store_true",
        help="use the built-in simulator as the engine (no GPU or Docker needed) and start it",
    )
    parser.add_argument("--ui-port", type=int, metavar="N", help="UI port for this run (ui.port)")
    parser.add_argument(
        "--api-port", type=int, metavar="N", help="API port for this run (gateway.port)"
    )
    parser.add_argument("--no-browser", action="store_true", help="do not open a browser window")
    parser.set_defaults(func=run)


def _port(value: int, flag: str) -> int:
    if not 1 <= value <= 65535:
        raise SettingsError(f"{flag} {value} is not a port.", hint="Use a number from 1 to 65535.")
    return value


def run(args: argparse.Namespace) -> int:
    from appliance import server  # uvicorn, fastapi and the UI load only for `up`

    loaded = load_settings()
    for warning in loaded.warnings:
        print(f"step-station: warning: {warning}", file=sys.stderr)
    overrides: dict[str, int] = {}  # for this run only: never saved
    if args.ui_port is not None:
        overrides["ui.port"] = _port(args.ui_port, "--ui-port")
    if args.api_port is not None:
        overrides["gateway.port"] = _port(args.api_port, "--api-port")
    settings = with_changes(loaded.settings, overrides)
    return server.run(
        settings,
        demo=args.demo,
        open_browser=not args.no_browser,
        announce=lambda line: print(line, flush=True),
    )
