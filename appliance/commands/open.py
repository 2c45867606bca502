"""`step-station open`: open the UI in a browser, with the per-install secret that unlocks it.

The UI on loopback asks for a secret only the owner's account can read (config/ui-token, 0600),
as Jupyter does; this command and the desktop entry carry it. `--print` prints the address
instead (to paste into a browser, or for a browser on another display).
"""

from __future__ import annotations

import argparse
import os
import sys
import webbrowser
from typing import Any

from appliance import web_guard
from appliance.settings import load_settings, with_changes


def register(sub: Any) -> None:
    parser = sub.add_parser(
        "open",
        help="open the browser UI (with the secret that unlocks it on this computer)",
        description="Open Step Station's UI in a browser. The address carries a per-install "
        "secret: keep it to yourself.",
    )
    parser.add_argument(
        "--print", action="store_true", help="print the address instead of opening a browser"
    )
    parser.add_argument(
        "--port", type=int, metavar="N", help="the UI port, when `up --ui-port N` changed it"
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    settings = load_settings().settings
    if args.port is not None:
        settings = with_changes(settings, {"ui.port": args.port})
    url = web_guard.open_url(settings)
    display = bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))
    if args.print or not (display or sys.platform == "darwin") or not webbrowser.open(url):
        print(url)
    return 0
