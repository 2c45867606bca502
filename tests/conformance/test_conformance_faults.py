"""Fault injection (simulator only; these skip against a real vLLM)."""

from __future__ import annotations

import time

import openai
import pytest
from conformance_servers import client_for, http_status, wait_until


def test_cuda_oom_at_start_exits_1(launch) -> None:
    server = launch(fault="oom", load_s=0.5, wait=False)
    statuses = set()
    deadline = time.monotonic() + 30
    while server.exit_code() is None and time.monotonic() < deadline:
        statuses.add(http_status(f"{server.url}/health", timeout=0.3))
        time.sleep(0.05)
    assert server.exit_code(timeout=30) == 1
    assert statuses <= {None}
    logs = server.logs()
    assert "torch.OutOfMemoryError: CUDA out of memory" in logs
    assert "Engine core initialization failed" in logs


def test_crash_after_n_seconds_exits_1(launch) -> None:
    server = launch(fault="crash", fault_after_s=1)
    assert http_status(f"{server.url}/health") == 200
    assert server.exit_code(timeout=30) == 1
    assert "EngineDeadError" in server.logs()


def test_hang_keeps_the_port_closed(launch) -> None:
    server = launch(fault="hang", load_s=1, fault_after_s=0.3, wait=False)
    # Docker's log driver holds a line until its newline, so wait for a log line, not the bar.
    wait_until(lambda: "Starting to load model" in server.logs(), 30, "loading to start")
    time.sleep(2)  # twice the whole load time: a healthy start would be up by now
    assert server.exit_code() is None
    assert http_status(f"{server.url}/health") is None
    assert "Application startup complete." not in server.logs()


def test_dead_engine_answers_503_and_500(launch) -> None:
    server = launch(fault="dead", fault_after_s=0.5)
    wait_until(lambda: http_status(f"{server.url}/health") == 503, 30, "/health 503")
    with pytest.raises(openai.InternalServerError) as err:
        client_for(server).chat.completions.create(
            model=server.model, messages=[{"role": "user", "content": "hi"}]
        )
    assert err.value.status_code == 500
    assert "EngineCore" in server.logs()
    assert server.exit_code() is None


def test_no_room_for_the_kv_cache_fails_like_vllm(launch) -> None:
    server = launch("--gpu-memory-utilization", "0.8", wait=False, load_s=0.3)
    assert server.exit_code(timeout=30) == 1
    assert "No available memory for the cache blocks" in server.logs()
