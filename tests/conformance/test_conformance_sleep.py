"""Dev-mode sleep endpoints (VLLM_SERVER_DEV_MODE=1 and --enable-sleep-mode)."""

from __future__ import annotations

import httpx
import pytest
from conformance_servers import client_for, scrape, value, wait_until


def is_sleeping(server) -> bool:
    return bool(httpx.get(f"{server.url}/is_sleeping", timeout=10).json()["is_sleeping"])


def sleep_state(server, state: str) -> float:
    return value(scrape(server), "vllm:engine_sleep_state", sleep_state=state)


def test_sleep_and_wake(launch) -> None:
    server = launch("--enable-sleep-mode", VLLM_SERVER_DEV_MODE="1")
    assert not is_sleeping(server)
    assert sleep_state(server, "awake") == 1
    assert httpx.post(f"{server.url}/sleep", params={"level": 1}, timeout=60).status_code == 200
    wait_until(lambda: is_sleeping(server), 60, "/is_sleeping to turn true")
    assert sleep_state(server, "weights_offloaded") == 1
    assert sleep_state(server, "awake") == 0
    assert httpx.post(f"{server.url}/wake_up", timeout=60).status_code == 200
    wait_until(lambda: not is_sleeping(server), 60, "/is_sleeping to turn false")
    assert sleep_state(server, "awake") == 1
    reply = client_for(server).chat.completions.create(
        model=server.model, messages=[{"role": "user", "content": "awake?"}], max_tokens=5
    )
    assert reply.usage.completion_tokens == 5


def test_sleep_routes_need_dev_mode(server) -> None:
    if server.model_kind == "remote":
        pytest.skip("a remote vLLM's dev mode is whatever it was launched with")
    # vLLM registers the dev routes only with VLLM_SERVER_DEV_MODE=1 (the shared real engines
    # and the default simulator run without it).
    assert httpx.post(f"{server.url}/sleep", params={"level": 1}, timeout=10).status_code == 404
    assert httpx.get(f"{server.url}/is_sleeping", timeout=10).status_code == 404
