"""The composition root's container: one object holding every long-lived service.

`appliance/server.py` builds it once and hands it to the FastAPI apps, the gateway and `ui/app.py`.
Each area adds its field here (engine supervisor, chat history, sampler, keys, gateway).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from appliance.settings import Secrets, Settings


@dataclass
class Services:
    settings: Settings
    secrets: Secrets = field(default_factory=Secrets)
    demo: bool = False
    supervisor: Any = None  # appliance.engine.Supervisor
    history: Any = None  # appliance.history.History
    chat: Any = None  # appliance.chat_service.ChatService
    sampler: Any = None  # appliance.sampler.Sampler
    progress_rates: Any = None  # appliance.timeline.ProgressRates (pull / download rates)
    keys: Any = None  # appliance.keys.KeyStore
    gateway: Any = None  # appliance.gateway.Gateway
    warnings: list[str] = field(default_factory=list)
