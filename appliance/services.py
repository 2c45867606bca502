"""The composition root's container: one object holding every long-lived service.

`appliance/server.py` builds it once and hands it to the FastAPI apps, the gateway and `ui/app.py`.
Each area adds its field here (engine supervisor, chat history, sampler, keys, gateway).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from appliance.settings import Secrets, Settings, SettingsStore

if TYPE_CHECKING:  # types only: building them imports heavy modules (see server.build_services)
    from appliance.bench.runner import BenchRunner
    from appliance.bench.tuning import TuneRunner
    from appliance.chat.history import History
    from appliance.chat.service import ChatService
    from appliance.engine.supervisor import Supervisor
    from appliance.gateway.service import Gateway
    from appliance.keys import KeyStore
    from appliance.monitoring.sampler import Sampler
    from appliance.monitoring.timeline import ProgressRates


@dataclass
class Services:
    """Built once by `server.build_services`; every part is there (typed, never None)."""

    store: SettingsStore  # the one owner of the settings: `store.update({...})` changes them
    secrets: Secrets
    demo: bool
    supervisor: Supervisor
    history: History
    chat: ChatService
    sampler: Sampler
    progress_rates: ProgressRates  # pull / download rates
    keys: KeyStore
    gateway: Gateway
    bench: BenchRunner  # `vllm bench serve`, one run at a time; `bench.current()` while it runs
    tune: TuneRunner  # vLLM's MoE tuner (the engine stopped meanwhile); `tune.current()`
    warnings: list[str] = field(default_factory=list)

    @property
    def settings(self) -> Settings:
        """The snapshot in force now (read it at each use; never keep it for later)."""
        return self.store.current()
