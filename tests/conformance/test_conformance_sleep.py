"""Dev-mode sleep endpoints (VLLM_SERVER_DEV_MODE=1 and --enable-sleep-mode)."""

from __future__ import annotations

import json

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


def test_sleep_aborts_running_requests(launch, kind: str) -> None:
    """`POST /sleep` aborts every running request: the stream ends with finish_reason "abort".

    vLLM 0.32: the route's `mode` defaults to "abort" (`entrypoints/serve/dev/sleep/
    api_router.py`) and `EngineCore.sleep` -> `pause_scheduler` finishes every request as
    aborted (`v1/engine/core.py`). Real vLLM on CPU refuses --enable-sleep-mode but
    VLLM_SERVER_DEV_MODE=1 alone gives the route, which pauses and aborts there too (the worker
    logs "sleep mode is not supported on CPU, ignore it." and moves no memory). This is why the
    supervisor never sleeps while a request runs (tests/integration/test_idle_sleep.py).
    """
    real = kind.startswith("real-")
    server = launch(
        *(() if real else ("--enable-sleep-mode",)), VLLM_SERVER_DEV_MODE="1", real_start=True
    )
    body = {
        "model": server.model,
        "messages": [{"role": "user", "content": "Tell me a long story."}],
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": 3000,
        "ignore_eos": True,
    }
    lines: list[str] = []
    with httpx.Client(timeout=300) as http:
        with http.stream("POST", f"{server.url}/v1/chat/completions", json=body) as response:
            reader = response.iter_lines()
            for line in reader:  # the answer is running once a token arrived
                if line.startswith("data: {") and _has_token(json.loads(line[6:])):
                    break
            slept = httpx.post(f"{server.url}/sleep", params={"level": 1}, timeout=120)
            lines = [line for line in reader if line.startswith("data: ")]
        assert slept.status_code == 200
        version = http.get(f"{server.url}/version").json()["version"]
        major_minor = tuple(int(p) for p in version.split(".")[:2])
        if major_minor >= (0, 32):  # 0.32 answers JSON; older releases an empty 200
            assert slept.json() == {"status": "sleeping", "level": 1}
        else:
            assert slept.content == b""
        assert lines[-1] == "data: [DONE]"
        chunks = [json.loads(line[6:]) for line in lines[:-1]]
        finishes = [c["choices"][0]["finish_reason"] for c in chunks if c.get("choices")]
        assert finishes[-1] == "abort", finishes
        assert chunks[-1]["usage"]["completion_tokens"] < 3000
        wait_until(lambda: is_sleeping(server), 60, "/is_sleeping to turn true")
        woke = http.post(f"{server.url}/wake_up", timeout=120)
        assert woke.status_code == 200
        if major_minor >= (0, 32):
            assert woke.json() == {"status": "awake", "tags": None}
    wait_until(lambda: not is_sleeping(server), 60, "/is_sleeping to turn false")
    reply = client_for(server).chat.completions.create(
        model=server.model, messages=[{"role": "user", "content": "awake?"}], max_tokens=5
    )
    assert reply.choices[0].finish_reason in ("stop", "length")


def _has_token(chunk: dict) -> bool:
    """A generated token in a stream chunk (not the first chunk's role and empty content): real
    vLLM sends no finish chunk for a request aborted before its first token."""
    choices = chunk.get("choices") or [{}]
    delta = choices[0].get("delta") or {}
    return bool(delta.get("reasoning") or delta.get("reasoning_content") or delta.get("content"))
