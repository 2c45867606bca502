"""Attacks on the running appliance (issue 12): a web page, another local user, a LAN neighbour
with and without a key, another container. Each test here tries to misuse a route and fails if
the defence is gone; docs/security.md maps each threat to its test.

Fixtures: `appliance` (a real `step-station up --demo`, tests/fixtures/appliance.py) and the
gateway kit of tests/integration (a real gateway in front of a simulator engine).
"""

from __future__ import annotations

import sys
from pathlib import Path

from fixtures.appliance import Appliance, appliance, module_appliance

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))  # gateway_kit

__all__ = ["Appliance", "appliance", "module_appliance"]
