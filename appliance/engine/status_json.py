"""`step-station status --json`: the engine's status as one JSON object.

`engine_payload()` gives the engine keys (`state`, `phase`, `profile`, `container_id`,
`engine_url`, `message`, then the rest of `EngineStatus`). Other areas add their own top-level
keys through `EXTENDERS` (the sampler adds `gpus` and `host`); an extender that fails leaves its
keys out and adds a line to `"warnings"`, never breaking the engine's part.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from appliance.engine.state import EngineStatus
from appliance.errors import ApplianceError
from appliance.settings import Settings

log = logging.getLogger(__name__)

# (settings, supervisor) -> extra top-level keys
Extender = Callable[[Settings, Any], dict[str, Any]]


def engine_payload(status: EngineStatus) -> dict[str, Any]:
    data = status.to_dict()
    head = ("state", "phase", "profile", "container_id", "engine_url", "message")
    return {key: data[key] for key in head} | {k: v for k, v in data.items() if k not in head}


def sampler_keys(settings: Settings, supervisor: Any) -> dict[str, Any]:
    """`gpus` and `host` from one sample of the dashboard's sampler."""
    from appliance.monitoring.sampler import status_payload, status_sample

    return status_payload(status_sample(settings, supervisor))


EXTENDERS: list[Extender] = [sampler_keys]


def status_json(status: EngineStatus, settings: Settings, supervisor: Any = None) -> dict[str, Any]:
    data = engine_payload(status)
    warnings: list[str] = []
    for extend in EXTENDERS:
        try:
            data.update(extend(settings, supervisor))
        except (ApplianceError, ImportError, OSError, ValueError, AttributeError) as err:
            log.info("status extender %s failed: %s", getattr(extend, "__name__", extend), err)
            warnings.append(f"{getattr(extend, '__name__', 'extender')}: {err}")
    if warnings:
        data["warnings"] = warnings
    return data
