"""`step-station status`: the engine's status and one sample of the GPUs and the host, together.

The engine's part (`appliance.engine.status_json.engine_payload`) knows nothing of the sampler;
this module adds the sampler's part, as the `gpus` and `host` keys for `--json` and as plain lines
otherwise, both from the same sample. A sample that fails leaves the engine's part whole and says
why in `"warnings"` (and in the lines).
"""

from __future__ import annotations

import logging
from typing import Any

from appliance.engine.state import EngineStatus
from appliance.engine.status_json import engine_payload
from appliance.errors import ApplianceError
from appliance.monitoring.sampler import (
    RunningEngine,
    status_lines,
    status_payload,
    status_sample,
)
from appliance.settings import Settings

log = logging.getLogger(__name__)


def status_report(
    status: EngineStatus, settings: Settings, supervisor: RunningEngine | None = None
) -> tuple[dict[str, Any], list[str]]:
    """(the `status --json` object, the lines `status` prints after the engine's state)."""
    data = engine_payload(status)
    try:
        sample = status_sample(settings, supervisor)
    except (ApplianceError, OSError, ValueError) as err:
        log.info("status: the GPU and host sample failed: %s", err)
        data["warnings"] = [f"sampler: {err}"]
        return data, [f"GPUs and host: not read ({err})"]
    return data | status_payload(sample), status_lines(sample)
