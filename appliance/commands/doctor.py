"""Placeholder: this command module is being written (see the issue that owns it)."""

from __future__ import annotations

import argparse
from typing import Any


def register(sub: Any) -> None:  # noqa: ARG001 - filled in by its owner
    del sub


def _unused(args: argparse.Namespace) -> int:
    return 0
