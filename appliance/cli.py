"""`step-station` command line: one subcommand module per area under appliance/commands/.

Errors are turned into a one-line reason and a non-zero exit code here and nowhere else.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from appliance import __version__
from appliance.errors import ApplianceError

# Each module exposes register(subparsers) and sets `func` on the parsers it adds.
COMMAND_MODULES = (
    "appliance.commands.up",
    "appliance.commands.open",
    "appliance.commands.engine",
    "appliance.commands.plan",
    "appliance.commands.doctor",
    "appliance.commands.keys",
    "appliance.commands.config",
    "appliance.commands.bench",
    "appliance.commands.tune",
    "appliance.commands.export",
    "appliance.commands.fleet",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="step-station",
        description="Run Step-3.7-Flash on this workstation: engine, chat UI, dashboard, LAN API.",
    )
    parser.add_argument("--version", action="version", version=f"step-station {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    # Whatever the appliance writes (settings, keys, history, logs) is its user's alone, even
    # under a shell's umask 022; explicit modes back this up where files are created.
    os.umask(0o077)
    parser = build_parser()
    args = parser.parse_args(argv)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    try:
        return int(func(args) or 0)
    except ApplianceError as err:
        print(f"step-station: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("step-station: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # `step-station ... | head`: the reader left; exit quietly like other Unix tools.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
