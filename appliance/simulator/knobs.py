"""Simulator settings from the environment (`STEP_SIM_*`): any client, Docker included, sets them.

Defaults give Step-3.7-Flash-like behaviour on a DGX Station: ~150 tokens/s per stream, a short
time to first token, and a load of a few seconds (the real one takes minutes).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

FAULTS = ("oom", "crash", "hang", "dead")


class KnobError(ValueError):
    """An STEP_SIM_* variable holds a value the simulator cannot use."""


def _float(env: Mapping[str, str], name: str, default: float, minimum: float = 0.0) -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise KnobError(f"{name}={raw!r} is not a number") from None
    if value < minimum:
        raise KnobError(f"{name}={raw!r} must be at least {minimum}")
    return value


def _optional_int(env: Mapping[str, str], *names: str) -> int | None:
    for name in names:
        raw = env.get(name, "").strip()
        if raw:
            try:
                value = int(raw)
            except ValueError:
                raise KnobError(f"{name}={raw!r} is not a whole number") from None
            if value < 1:
                raise KnobError(f"{name}={raw!r} must be at least 1")
            return value
    return None


@dataclass(frozen=True)
class Knobs:
    load_s: float = 5.0
    tokens_per_s: float = 150.0
    ttft_ms: float = 150.0
    prefill_tokens_per_s: float = 20000.0
    output_tokens: int | None = None
    fault: str | None = None
    fault_after_s: float | None = None
    log_interval_s: float = 10.0
    gpu_memory_gib: float = 250.7
    sleep_s: float = 0.3
    dev_mode: bool = False
    env_api_key: str | None = None
    # Paths the simulated engine does not serve (STEP_SIM_WITHOUT_ROUTES, comma-separated), as an
    # older vLLM without /v1/messages or /v1/responses, or one without /openapi.json.
    without_routes: tuple[str, ...] = ()

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Knobs:
        env = os.environ if env is None else env
        fault = env.get("STEP_SIM_FAULT", "").strip().lower() or None
        if fault is not None and fault not in FAULTS:
            raise KnobError(f"STEP_SIM_FAULT={fault!r} is not one of {', '.join(FAULTS)}")
        after = env.get("STEP_SIM_FAULT_AFTER_S", "").strip()
        return cls(
            load_s=_float(env, "STEP_SIM_LOAD_S", cls.load_s),
            tokens_per_s=_float(env, "STEP_SIM_TOKENS_PER_S", cls.tokens_per_s, 0.001),
            ttft_ms=_float(env, "STEP_SIM_TTFT_MS", cls.ttft_ms),
            prefill_tokens_per_s=_float(
                env, "STEP_SIM_PREFILL_TOKENS_PER_S", cls.prefill_tokens_per_s, 1.0
            ),
            output_tokens=_optional_int(env, "STEP_SIM_OUTPUT_TOKENS", "STEP_SIM_MAX_TOKENS"),
            fault=fault,
            fault_after_s=_float(env, "STEP_SIM_FAULT_AFTER_S", 0.0) if after else None,
            log_interval_s=_float(env, "STEP_SIM_LOG_INTERVAL_S", cls.log_interval_s, 0.1),
            gpu_memory_gib=_float(env, "STEP_SIM_GPU_MEMORY_GIB", cls.gpu_memory_gib, 1.0),
            sleep_s=_float(env, "STEP_SIM_SLEEP_S", cls.sleep_s),
            dev_mode=env.get("VLLM_SERVER_DEV_MODE", "").strip() in ("1", "true", "True"),
            env_api_key=env.get("VLLM_API_KEY") or None,
            without_routes=tuple(
                p.strip() for p in env.get("STEP_SIM_WITHOUT_ROUTES", "").split(",") if p.strip()
            ),
        )
