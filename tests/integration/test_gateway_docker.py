"""The gateway in front of the engine in Docker: the simulator image from the local registry as
`vllm/vllm-openai:stepfun37`, run by the real supervisor (runtime=docker, no GPU request), with
the official openai SDK as the client.

One engine container for the module (starting one takes seconds on this machine); the first test
begins with it stopped, to see 503 and then success once it is started.
"""

from __future__ import annotations

import json
import socket
import uuid
from pathlib import Path

import openai
import pytest
from gateway_kit import (
    MODEL,
    GatewayStack,
    free_port,
    http,
    png_data_url,
    running_requests,
    start_gateway,
    wait_until,
)

from appliance import settings as st
from appliance.engine import EngineState, Supervisor
from appliance.engine.spec import LABEL_NAME

pytestmark = [pytest.mark.docker, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def module_home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("gateway-docker-home")


@pytest.fixture(autouse=True)
def station_home(module_home: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """One appliance home for the module's engine and gateway (overrides the per-test home of
    tests/conftest.py): where the engine's socket is depends on it."""
    monkeypatch.setenv("STEP_STATION_HOME", str(module_home))
    return module_home


@pytest.fixture(scope="module")
def docker_engine(docker_client, sim_image_ref, module_home: Path):
    """A supervisor for a not-yet-started engine container (removed after the module)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("STEP_STATION_HOME", str(module_home))
    mp.setenv("STEP_SIM_LOAD_S", "1")
    mp.setenv("STEP_SIM_TTFT_MS", "20")
    mp.setenv("STEP_SIM_TOKENS_PER_S", "60")
    settings = st.with_changes(
        st.Settings(),
        {
            "engine.container_name": f"ss-gw-{uuid.uuid4().hex[:10]}",
            "engine.port": free_port(),
            "engine.image": sim_image_ref,
            "engine.profile": "fp8-tp1",
            "engine.request_gpu": False,  # this Docker engine has no NVIDIA runtime
            "engine.start_timeout_s": 120,
            "engine.stop_timeout_s": 10,
            "gateway.port": free_port(),
            "gateway.require_key_on_loopback": True,
            "gateway.max_body_mb": 1,
            "gateway.per_key_concurrency": 2,
        },
    )
    sup = Supervisor(settings, download_weights=False, poll_interval_s=0.1, outside_poll_s=0)
    yield sup
    sup.close()
    for container in docker_client.containers.list(
        all=True, filters={"label": f"{LABEL_NAME}={settings.engine.container_name}"}
    ):
        container.remove(force=True)
    mp.undo()


@pytest.fixture(scope="module")
def stack(docker_engine):
    gw = start_gateway(docker_engine.settings, docker_engine, docker_engine.engine_url)
    yield gw
    gw.gateway.stop()


def test_503_while_the_engine_is_not_running_then_success_after_start(docker_engine, stack):
    key = stack.key("first")
    client = stack.client(key)
    with pytest.raises(openai.APIStatusError) as caught:
        client.models.list()
    assert caught.value.status_code == 503
    assert caught.value.body["engine_state"] in ("absent", "stopped")
    assert int(caught.value.response.headers["retry-after"]) > 0
    docker_engine.start()
    with pytest.raises(openai.APIStatusError) as starting:
        client.models.list()
    assert starting.value.status_code == 503
    assert starting.value.body["engine_state"] in ("pulling_image", "starting")
    assert docker_engine.wait_ready(120).state == EngineState.READY
    assert wait_until(lambda: _ok(client), timeout_s=10)
    assert [m.id for m in client.models.list()] == [MODEL]


def _ok(client) -> bool:
    try:
        client.models.list()
    except openai.APIStatusError:
        return False
    return True


@pytest.fixture
def ready(docker_engine, stack) -> GatewayStack:
    if docker_engine.status().state != EngineState.READY:
        docker_engine.start()
        docker_engine.wait_ready(120)
    assert wait_until(lambda: _ok(stack.client(stack.key(f"probe-{uuid.uuid4().hex[:6]}"))))
    return stack


def test_sdk_stream_with_images_and_reasoning_completions_and_usage_per_key(ready):
    alice, bob = ready.key("alice"), ready.key("bob")
    client = ready.client(alice)
    image = png_data_url(320, 200)
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=[
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": image}},
                        {"type": "text", "text": "Describe the picture."},
                    ],
                }
            ],
            reasoning_effort="low",
            max_tokens=200,  # low: a tenth of it is reasoning
            stream=True,
            extra_body={"ignore_eos": True},
        )
    )
    reasoning = "".join((c.choices[0].delta.model_extra or {}).get("reasoning") or ""
                        for c in chunks if c.choices)  # fmt: skip
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "Reasoning level: low" in reasoning
    assert "1 image(s)" in reasoning
    assert content
    assert all(c.usage is None for c in chunks)

    completion = client.completions.create(
        model=MODEL, prompt="Say something", max_tokens=12, extra_body={"ignore_eos": True}
    )
    assert completion.usage.completion_tokens == 12
    other = ready.client(bob).chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=9,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    assert [c.usage.completion_tokens for c in other if c.usage] == [9]
    counts = {k.name: k for k in ready.keys.list()}
    assert (counts["alice"].requests, counts["alice"].completion_tokens) == (2, 212)
    assert (counts["bob"].requests, counts["bob"].completion_tokens) == (1, 9)


def test_401_404_413_429_in_openai_shape(ready):
    key = ready.key("limits")
    with pytest.raises(openai.AuthenticationError):
        ready.client("sk-step-not-a-key").models.list()
    for method, target in [
        ("GET", "/metrics"),
        ("POST", "/tokenize"),
        ("POST", "/invocations"),
        ("POST", "/sleep?level=1"),
        ("GET", "/v1/../metrics"),
        ("GET", "/v1/%2e%2e/metrics"),
        ("GET", "//v1/models"),
        ("GET", "/v1/models/"),
    ]:
        reply = ready.raw(http(method, target, body=b"{}" if method == "POST" else b"",
                               headers={"Authorization": f"Bearer {key}"}))  # fmt: skip
        assert reply.status == 404, target
        assert reply.json()["error"]["code"] == "not_found"
        assert "via" not in reply.headers
    client = ready.client(key)
    with pytest.raises(openai.APIStatusError) as too_big:
        client.chat.completions.create(
            model=MODEL,
            messages=[
                {
                    "role": "user",
                    "content": [
                        {
                            "type": "image_url",
                            "image_url": {"url": png_data_url(700, 700, noise=True)},
                        }
                    ],
                }
            ],
        )
    assert too_big.value.status_code == 413
    streams = [
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=400, stream=True
        )
        for _ in range(2)
    ]
    for s in streams:
        next(iter(s))
    with pytest.raises(openai.RateLimitError) as limited:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "y"}])
    assert limited.value.body["code"] == "concurrency_limit_exceeded"
    assert limited.value.response.headers["retry-after"] == "1"
    for s in streams:
        s.close()


def test_disconnect_mid_stream_drops_the_engines_running_count(ready):
    key = ready.key("leaver")
    engine = ready.engine_url
    assert wait_until(lambda: running_requests(engine) == 0, timeout_s=10)
    stream = ready.client(key).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "long"}], max_tokens=2000, stream=True
    )
    it = iter(stream)
    for _ in range(3):
        next(it)
    assert running_requests(engine) == 1
    stream.close()
    assert wait_until(lambda: running_requests(engine) == 0, timeout_s=5)

    body = json.dumps({"model": MODEL, "stream": True,
                       "messages": [{"role": "user", "content": "x"}]}).encode()  # fmt: skip
    sock = socket.create_connection((ready.host, ready.port))
    sock.sendall(http("POST", "/v1/chat/completions", body=body,
                      headers={"Authorization": f"Bearer {key}"}))  # fmt: skip
    assert wait_until(lambda: running_requests(engine) == 1, timeout_s=5)
    sock.close()
    assert wait_until(lambda: running_requests(engine) == 0, timeout_s=5)
