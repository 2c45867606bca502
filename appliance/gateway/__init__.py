"""The LAN endpoint: an allowlisting, key-checking OpenAI-compatible gateway in front of the engine.

- `app.py`: the ASGI app (routes, keys, limits, streaming pass-through, usage counting).
- `service.py`: `Gateway`, the listener on its own loop thread (`start`, `stop`, `apply_settings`).
- `engine_gate.py`: cached engine readiness and the optional start-or-wake on request.
- `limits.py`, `sse.py`, `access.py`: limits, server-sent-event usage tap, access log.
- `sharing.py`: the sharing panel's logic (addresses, keys, UI on LAN).
"""

from __future__ import annotations

from appliance.gateway.app import GatewayApp, GatewayConfig
from appliance.gateway.engine_gate import EngineGate, FixedEngine
from appliance.gateway.service import Gateway, bind_host

__all__ = ["EngineGate", "FixedEngine", "Gateway", "GatewayApp", "GatewayConfig", "bind_host"]
