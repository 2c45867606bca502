"""The engine's part of `step-station status --json`.

The GPU and host keys are added by `appliance.monitoring.status`, so the engine package does not
depend on the sampler.
"""

from __future__ import annotations

from typing import Any

from appliance.engine.state import EngineStatus


def engine_payload(status: EngineStatus) -> dict[str, Any]:
    """`state`, `phase`, `profile`, `container_id`, `engine_url`, `message` first (what a reader
    looks for), then the rest of `EngineStatus` in its own order."""
    data = status.to_dict()
    head = ("state", "phase", "profile", "container_id", "engine_url", "message")
    return {key: data[key] for key in head} | {k: v for k, v in data.items() if k not in head}
