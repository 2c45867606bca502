"""The gateway in front of the real simulator process (no Docker): the official openai SDK as the
client, raw sockets for what the SDK cannot send. The Docker variant is test_gateway_docker.py."""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx
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

from appliance import endpoint
from appliance import settings as st
from appliance.engine import EngineState, Supervisor
from appliance.errors import PortInUseError
from appliance.gateway import FixedEngine

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def make_stack(simulator):
    stacks: list[GatewayStack] = []

    def make(*, sim_knobs: dict | None = None, **gateway_settings) -> GatewayStack:
        sim = simulator(uds=True, **(sim_knobs or {}))  # the engine on its socket, as in the app
        settings = st.with_changes(
            st.Settings(),
            {"gateway.port": free_port()}
            | {f"gateway.{k}": v for k, v in gateway_settings.items()},
        )
        stack = start_gateway(settings, FixedEngine(sim.url, MODEL), sim.url)
        stacks.append(stack)
        return stack

    yield make
    for stack in stacks:
        stack.gateway.stop()


def _image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def _reasoning(delta) -> str:
    extra = delta.model_extra or {}
    return extra.get("reasoning") or extra.get("reasoning_content") or ""


# ---------------------------------------------------------------------------------- the SDK


def test_sdk_models_streaming_chat_with_images_completions_and_usage_per_key(make_stack) -> None:
    stack = make_stack(require_key_on_loopback=True)
    alice, bob = stack.key("alice"), stack.key("bob")
    client = stack.client(alice)

    assert [m.id for m in client.models.list()] == [MODEL]

    image = png_data_url(64, 48)
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is in these pictures?"},
                    {"type": "image_url", "image_url": {"url": image}},
                    {"type": "image_url", "image_url": {"url": image}},
                ],
            }
        ],
        reasoning_effort="high",
        max_tokens=120,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    chunks = list(stream)
    reasoning = "".join(_reasoning(c.choices[0].delta) for c in chunks if c.choices)
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "Reasoning level: high" in reasoning
    assert "2 image(s)" in reasoning
    assert content  # the answer streamed after the reasoning
    # The gateway asked the engine for usage to count tokens, and hid that chunk again.
    assert all(c.usage is None for c in chunks)
    assert all(c.choices for c in chunks)

    with_usage = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=30,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    usage_chunks = [c for c in with_usage if c.usage is not None]
    assert len(usage_chunks) == 1
    assert usage_chunks[0].usage.completion_tokens == 30

    completion = client.completions.create(
        model=MODEL, prompt="Once upon a time", max_tokens=25, extra_body={"ignore_eos": True}
    )
    assert completion.choices[0].text
    assert completion.usage.completion_tokens == 25

    other = stack.client(bob).chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "hello"}],
        max_tokens=7,
        extra_body={"ignore_eos": True},
    )
    assert other.usage.completion_tokens == 7

    counts = {k.name: k for k in stack.keys.list()}
    assert counts["alice"].requests == 4  # models + stream + stream with usage + completion
    assert counts["alice"].completion_tokens == 120 + 30 + 25
    assert counts["alice"].prompt_tokens > 0
    assert counts["alice"].last_address == "127.0.0.1"
    assert counts["bob"].requests == 1
    assert counts["bob"].completion_tokens == 7


def test_model_names_other_than_the_served_one_are_a_clear_404(make_stack) -> None:
    stack = make_stack()
    client = stack.client()
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])
    body = caught.value.body
    assert body["code"] == "model_not_found"
    assert MODEL in body["message"]
    assert "gpt-4o" in body["message"]
    # No model at all: the served one is used.
    reply = stack.raw(
        http(
            "POST",
            "/v1/chat/completions",
            body=b'{"messages":[{"role":"user","content":"hi"}],"max_tokens":3}',
            headers={"Content-Type": "application/json"},
        )
    )
    assert reply.status == 200
    assert reply.json()["model"] == MODEL


# ------------------------------------------------------------------------------------- keys


def test_keys_401_then_429_for_an_address_that_keeps_failing(make_stack) -> None:
    stack = make_stack(require_key_on_loopback=True)
    good = stack.key("good")
    missing = stack.raw(http("GET", "/v1/models"))  # the SDK always sends some key
    assert missing.status == 401
    assert missing.json()["error"]["code"] == "missing_api_key"
    for _ in range(8):
        with pytest.raises(openai.AuthenticationError) as wrong:
            stack.client(good[:-2] + "xx").models.list()
        assert wrong.value.body["code"] == "invalid_api_key"
    revoked = stack.key("soon-revoked")
    stack.keys.revoke("soon-revoked")
    with pytest.raises(openai.AuthenticationError):
        stack.client(revoked).models.list()  # tenth failure: now locked out
    with pytest.raises(openai.RateLimitError) as locked:
        stack.client(good).models.list()
    assert locked.value.body["code"] == "too_many_failed_authentications"
    retry_after = int(locked.value.response.headers["retry-after"])
    assert 1 <= retry_after <= 60


def test_a_good_key_resets_the_failure_count(make_stack) -> None:
    stack = make_stack(require_key_on_loopback=True)
    good = stack.key("good")
    for _ in range(3):
        for _ in range(9):
            with pytest.raises(openai.AuthenticationError):
                stack.client("sk-step-wrong").models.list()
        assert stack.client(good).models.list().data  # never locked: the count was reset


# ------------------------------------------------------------------------------ the allowlist

TRICKS = [
    ("GET", "/metrics"),
    ("GET", "/health"),
    ("POST", "/tokenize"),
    ("POST", "/detokenize"),
    ("POST", "/invocations"),
    ("GET", "/ping"),
    ("POST", "/sleep?level=1"),
    ("POST", "/wake_up"),
    ("GET", "/is_sleeping"),
    ("POST", "/pause"),
    ("POST", "/abort_requests"),
    ("POST", "/collective_rpc"),
    ("GET", "/version"),
    ("GET", "/load"),
    ("GET", "/v1/../metrics"),
    ("GET", "/v1/models/../../metrics"),
    ("POST", "/v1/chat/completions/../../../tokenize"),
    ("GET", "//v1/models"),
    ("GET", "/v1//models"),
    ("GET", "/v1/models/"),
    ("GET", "/v1/./models"),
    ("GET", "/V1/models"),
    ("GET", "/v1/Models"),
    ("GET", "/v1/%2e%2e/metrics"),
    ("GET", "/v1/%2E%2E/metrics"),
    ("GET", "/v1%2fmodels"),
    ("GET", "/%76%31/models"),
    ("GET", "/v1/models%00"),
    ("GET", "/v1/models;x=1"),
    ("GET", "/v1\\..\\metrics"),
    ("GET", "http://127.0.0.1/metrics"),
    ("GET", "*"),
    ("HEAD", "/v1/models"),
    ("OPTIONS", "/v1/models"),
    ("OPTIONS", "*"),
    ("DELETE", "/v1/models"),
    ("GET", "/v1/chat/completions"),
    ("PUT", "/v1/completions"),
    ("POST", "/v1/models"),
    ("GET", "/v1/models/" + MODEL),
    ("POST", "/v1/embeddings"),
    ("POST", "/v1/audio/transcriptions"),
    # Beside the agent routes: vLLM serves these too (stored responses, token counts, and the
    # render endpoints that return processed tensors); none is forwarded.
    ("GET", "/v1/responses/resp_0123"),
    ("POST", "/v1/responses/resp_0123/cancel"),
    ("POST", "/v1/responses/render"),
    ("POST", "/v1/messages/count_tokens"),
    ("POST", "/v1/messages/render"),
    ("GET", "/v1/messages"),
    ("GET", "/v1/responses"),
    ("POST", "/v1/messages/"),
    ("POST", "/v1/responses/"),
    ("POST", "/V1/messages"),
    ("POST", "/v1/Responses"),
    ("POST", "/v1/messages/../../tokenize"),
    ("POST", "/v1/responses/..%2f..%2fmetrics"),
    ("POST", "/v1/%6dessages"),
    ("POST", "/v1//responses"),
    ("POST", "/v1/messages%00"),
    ("GET", "/docs"),
    ("GET", "/openapi.json"),
    ("GET", "/"),
]


@pytest.mark.parametrize("require_key", [False, True])
def test_everything_but_the_five_routes_is_404_and_never_reaches_the_engine(
    make_stack, require_key: bool
) -> None:
    stack = make_stack(require_key_on_loopback=require_key)
    key = stack.key("k")
    for method, target in TRICKS:
        reply = stack.raw(
            http(
                method,
                target,
                body=b"{}" if method in ("POST", "PUT") else b"",
                headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
            )
        )
        where = f"{method} {target}"
        assert reply.status == 404, where
        assert "via" not in reply.headers, where  # answered by the gateway, not the engine
        if method != "HEAD":
            error = reply.json()["error"]
            assert error["code"] == "not_found", where
            assert error["type"] == "invalid_request_error", where
            assert b"vllm:" not in reply.body, where
    # The allowed routes still work with the same key (the query string is dropped: the
    # anthropic SDK's beta calls post to /v1/messages?beta=true).
    ok = stack.raw(http("GET", "/v1/models?x=1", headers={"Authorization": f"Bearer {key}"}))
    assert ok.status == 200
    assert ok.headers["via"] == "1.1 step-station"
    beta = stack.raw(
        http(
            "POST",
            "/v1/messages?beta=true",
            body=json.dumps(
                {"max_tokens": 3, "messages": [{"role": "user", "content": "x"}]}
            ).encode(),
            headers={"x-api-key": key, "Content-Type": "application/json"},
        )
    )
    assert beta.status == 200, beta.body
    assert beta.json()["type"] == "message"


# --------------------------------------------------------------------------------- limits


def test_a_body_over_the_limit_is_413_declared_or_chunked(make_stack) -> None:
    stack = make_stack(max_body_mb=1)
    big = png_data_url(700, 700, noise=True)  # ~2 MB of base64
    with pytest.raises(openai.APIStatusError) as caught:
        stack.client().chat.completions.create(
            model=MODEL,
            messages=[
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": big}}]}
            ],
        )
    assert caught.value.status_code == 413
    assert caught.value.body["code"] == "request_too_large"
    # Chunked, no Content-Length: counted while it arrives.
    payload = json.dumps({"model": MODEL, "messages": [], "pad": "x" * (1 << 21)}).encode()
    chunked = b"".join(
        b"%x\r\n%s\r\n" % (len(payload[i : i + 65536]), payload[i : i + 65536])
        for i in range(0, len(payload), 65536)
    )
    reply = stack.raw(
        http(
            "POST",
            "/v1/chat/completions",
            body=chunked + b"0\r\n\r\n",
            headers={"Transfer-Encoding": "chunked", "Content-Type": "application/json"},
        )
    )
    assert reply.status == 413
    # A body under the limit goes through.
    small = stack.client().chat.completions.create(
        model=MODEL,
        messages=[
            {
                "role": "user",
                "content": [{"type": "image_url", "image_url": {"url": png_data_url()}}],
            }
        ],
        max_tokens=5,
    )
    assert small.choices[0].message is not None


def test_bad_json_is_400_in_openai_shape(make_stack) -> None:
    stack = make_stack()
    for body in (b"{not json", b"[1,2]", b'"text"', b"\xff\xfe"):
        reply = stack.raw(
            http("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "x"})
        )
        assert reply.status == 400, body
        assert reply.json()["error"]["code"] == "invalid_json"


def test_per_key_concurrency_and_rate_limits_are_429(make_stack) -> None:
    stack = make_stack(
        require_key_on_loopback=True,
        per_key_concurrency=1,
        sim_knobs={"tokens_per_s": 50},
    )
    key, other = stack.key("one-at-a-time"), stack.key("other")
    client = stack.client(key)
    first = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=500, stream=True
    )
    next(iter(first))  # running now
    with pytest.raises(openai.RateLimitError) as caught:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "y"}])
    assert caught.value.body["code"] == "concurrency_limit_exceeded"
    assert caught.value.response.headers["retry-after"] == "1"
    assert stack.client(other).models.list().data  # limits are per key
    first.close()
    assert wait_until(lambda: stack.gateway.app.limiter.running(stack.keys.verify(key).id) == 0)

    # The rate, changed live (no restart): 3 per minute.
    settings = st.with_changes(stack.settings, {"gateway.per_key_requests_per_minute": 3})
    stack.gateway.apply_settings(settings)
    rate_client = stack.client(other)
    for _ in range(2):  # `other` already used one of its 3
        rate_client.models.list()
    with pytest.raises(openai.RateLimitError) as limited:
        rate_client.models.list()
    assert limited.value.body["code"] == "rate_limit_exceeded"
    assert 1 <= int(limited.value.response.headers["retry-after"]) <= 60


# ------------------------------------------------------------------------------ streaming


def test_a_client_that_disconnects_mid_stream_ends_the_engine_request(make_stack) -> None:
    stack = make_stack(sim_knobs={"tokens_per_s": 30})
    engine = stack.engine_url
    stream = stack.client().chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "long"}], max_tokens=3000, stream=True
    )
    chunks = iter(stream)
    for _ in range(3):
        next(chunks)
    assert running_requests(engine) == 1
    stream.close()
    assert wait_until(lambda: running_requests(engine) == 0, timeout_s=5)

    # The same with a raw socket closed abruptly, and while waiting for the first token.
    body = json.dumps(
        {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "stream": True}
    ).encode()
    for _ in range(2):
        sock = socket.create_connection((stack.host, stack.port))
        sock.sendall(
            http("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "a/json"})
        )
        assert wait_until(lambda: running_requests(engine) == 1, timeout_s=5)
        sock.close()
        assert wait_until(lambda: running_requests(engine) == 0, timeout_s=5)
    notes = [r.note for r in stack.gateway.recent(5)]
    assert "client disconnected" in notes


def test_streamed_events_pass_through_as_they_come(make_stack) -> None:
    """Each event reaches the client while the engine is still generating (no buffering)."""
    stack = make_stack(sim_knobs={"tokens_per_s": 20, "ttft_ms": 0})
    arrivals = []
    with httpx.stream(
        "POST",
        f"{stack.base_url}/chat/completions",
        json={"model": MODEL, "messages": [{"role": "user", "content": "x"}], "stream": True,
              "max_tokens": 12, "ignore_eos": True},
        timeout=30,
    ) as response:  # fmt: skip
        for line in response.iter_lines():
            if line.startswith("data: {"):
                arrivals.append(time.monotonic())
    # 12 tokens at 20/s take ~0.55 s; events spread over that time instead of arriving at once.
    assert len(arrivals) >= 12
    assert arrivals[-1] - arrivals[0] > 0.3


# ------------------------------------------------------------------------- engine readiness


def test_engine_not_ready_is_503_then_success_after_start(simulator, monkeypatch) -> None:
    del simulator  # the supervisor starts its own simulator process
    monkeypatch.setenv("STEP_SIM_LOAD_S", "1")
    settings = st.with_changes(
        st.Settings(),
        {
            "engine.port": free_port(),
            "engine.profile": "fp8-tp1",
            "engine.start_timeout_s": 60,
            "engine.stop_timeout_s": 10,
            "gateway.port": free_port(),
        },
    )
    sup = Supervisor.for_demo(settings, poll_interval_s=0.1, outside_poll_s=0)
    stack = start_gateway(sup.settings, sup, sup.engine_url)
    try:
        client = stack.client()
        with pytest.raises(openai.APIStatusError) as caught:
            client.models.list()
        assert caught.value.status_code == 503
        assert caught.value.body["code"] == "engine_not_ready"
        assert caught.value.body["engine_state"] in ("absent", "stopped")
        assert int(caught.value.response.headers["retry-after"]) > 0
        assert "Model tab" in caught.value.body["message"]

        sup.start()
        with pytest.raises(openai.APIStatusError) as starting:
            client.models.list()
        assert starting.value.status_code == 503
        assert starting.value.body["engine_state"] == "starting"  # the supervisor told it
        sup.wait_ready(60)
        assert wait_until(lambda: _ok(client), timeout_s=5)

        # Start on request (the owner's setting): a stopped engine is started by a request.
        sup.stop()
        assert wait_until(lambda: _status(client) == 503, timeout_s=5)
        stack.settings = st.with_changes(stack.settings, {"gateway.start_on_request": True})
        stack.gateway.apply_settings(stack.settings)
        with pytest.raises(openai.APIStatusError) as woke:
            client.models.list()
        assert woke.value.status_code == 503
        assert woke.value.body["engine_state"] == "starting"
        assert wait_until(lambda: sup.status().state == EngineState.READY, timeout_s=60)
        assert wait_until(lambda: _ok(client), timeout_s=5)
    finally:
        stack.gateway.stop()
        sup.stop()
        sup.close()


def _status(client: openai.OpenAI) -> int:
    try:
        client.models.list()
    except openai.APIStatusError as err:
        return err.status_code
    return 200


def _ok(client: openai.OpenAI) -> bool:
    return _status(client) == 200


# ----------------------------------------------------------------------- sharing and ports


def test_switching_sharing_rebinds_live_and_needs_keys(make_stack) -> None:
    """127.0.0.2 stands in for a LAN interface (servers here bind to loopback only)."""
    stack = make_stack(sim_knobs={"tokens_per_s": 40})
    port = stack.port
    assert stack.gateway.host == "127.0.0.1"
    assert stack.client().models.list().data  # no key needed while not shared
    in_flight = stack.client().chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=40, stream=True,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    iterator = iter(in_flight)
    next(iterator)

    settings = st.with_changes(
        stack.settings, {"gateway.share_lan": True, "gateway.interface": "127.0.0.2"}
    )
    stack.gateway.apply_settings(settings)
    assert (stack.gateway.host, stack.gateway.port) == ("127.0.0.2", port)
    assert stack.gateway.shared
    with pytest.raises(OSError):  # noqa: PT011 - refused: nothing listens there any more
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    lan = openai.OpenAI(base_url=f"http://127.0.0.2:{port}/v1", api_key="none", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        lan.models.list()
    key = stack.key("laptop")
    lan_keyed = openai.OpenAI(base_url=f"http://127.0.0.2:{port}/v1", api_key=key, max_retries=0)
    assert [m.id for m in lan_keyed.models.list()] == [MODEL]
    # The stream that started on the old listener finished (widening keeps it).
    assert len(list(iterator)) >= 30

    lan_stream = lan_keyed.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "y"}], max_tokens=2000, stream=True
    )
    lan_iter = iter(lan_stream)
    next(lan_iter)
    settings = st.with_changes(settings, {"gateway.share_lan": False})
    stack.gateway.apply_settings(settings)
    assert stack.gateway.host == "127.0.0.1"
    assert not stack.gateway.shared
    # Sharing off cuts the LAN client at once; the engine request ends with it.
    with pytest.raises((openai.APIError, httpx.HTTPError)):
        for _ in lan_iter:
            pass
    assert wait_until(lambda: running_requests(stack.engine_url) == 0, timeout_s=5)
    assert stack.client().models.list().data


def test_a_taken_port_is_a_clear_error_and_keeps_the_old_listener(make_stack) -> None:
    stack = make_stack()
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen()
    taken = blocker.getsockname()[1]
    try:
        settings = st.with_changes(st.Settings(), {"gateway.port": taken})
        from appliance.gateway import Gateway

        with pytest.raises(PortInUseError, match=str(taken)):
            Gateway(settings, stack.keys, FixedEngine(stack.engine_url, MODEL)).start()
        moved = st.with_changes(stack.settings, {"gateway.port": taken})
        with pytest.raises(PortInUseError, match=r"gateway\.port"):
            stack.gateway.apply_settings(moved)
        assert stack.gateway.port != taken
        assert stack.client().models.list().data  # still serving where it was
    finally:
        blocker.close()


def test_the_access_log_has_no_keys_and_no_bodies(make_stack, station_home) -> None:
    stack = make_stack(require_key_on_loopback=True)
    key = stack.key("logged")
    secret_text = "my very private prompt 7781"
    stack.client(key).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": secret_text}], max_tokens=5
    )
    with pytest.raises(openai.AuthenticationError):
        stack.client(key + "wrong").models.list()
    stack.raw(http("GET", f"/metrics?api_key={key}"))
    stack.gateway.stop()
    log = (station_home / "data" / "logs" / "gateway-access.log").read_text()
    lines = log.strip().splitlines()
    assert len(lines) == 3
    assert "key=logged(" in lines[0]
    assert '"POST /v1/chat/completions" 200' in lines[0]
    assert '" 401' in lines[1] or " 401 " in lines[1]
    assert '"GET /metrics" 404' in lines[2]  # the query string is never logged
    assert key not in log
    assert key[len("sk-step-") + 8 :] not in log
    assert secret_text not in log


def test_concurrent_clients_share_the_engine(make_stack) -> None:
    stack = make_stack(sim_knobs={"tokens_per_s": 200})
    errors: list[BaseException] = []
    totals: list[int] = []

    def one() -> None:
        try:
            stream = stack.client().chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=40,
                stream=True, stream_options={"include_usage": True},
                extra_body={"ignore_eos": True},
            )  # fmt: skip
            totals.append(sum(c.usage.completion_tokens for c in stream if c.usage))
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=one) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors
    assert totals == [40] * 16


def test_an_engine_that_went_away_is_503_in_each_apis_shape(make_stack, tmp_path) -> None:
    """The engine's socket refuses the connection (it is restarting): 503 with Retry-After, the
    gateway's answer and not a 500, on every route."""
    stack = make_stack()
    gone = FixedEngine(endpoint.socket_url(str(tmp_path / "gone.sock")), MODEL)
    dead = start_gateway(
        st.with_changes(stack.settings, {"gateway.port": free_port()}), gone, gone.url
    )
    try:
        bodies = {
            "/v1/chat/completions": {"messages": [{"role": "user", "content": "x"}]},
            "/v1/responses": {"input": "x"},
            "/v1/messages": {"max_tokens": 5, "messages": [{"role": "user", "content": "x"}]},
        }
        for path, body in bodies.items():
            reply = dead.raw(http("POST", path, body=json.dumps(body).encode()))
            assert reply.status == 503, (path, reply.body)
            assert reply.headers["retry-after"] == "5"
            error = reply.json()["error"]
            assert error["code"] == "engine_unreachable", path
            assert error["type"] == (
                "overloaded_error" if path == "/v1/messages" else "server_error"
            )
    finally:
        dead.gateway.stop()


def test_odd_but_valid_json_is_forwarded_or_refused_cleanly(make_stack) -> None:
    stack = make_stack()
    # Text JSON allows but UTF-8 cannot carry (a lone surrogate), in a streamed request the
    # gateway rewrites (it adds include_usage): forwarded, never a gateway error.
    for text, engine_ok in (("\u2028 line separator", True), ("\ud800 lone surrogate", False)):
        body = json.dumps(
            {"model": MODEL, "stream": True, "max_tokens": 5,
             "messages": [{"role": "user", "content": text}]}
        ).encode()  # fmt: skip
        reply = stack.raw(http("POST", "/v1/chat/completions", body=body))
        assert reply.headers.get("via") == "1.1 step-station"  # the engine answered
        if engine_ok:
            assert reply.status == 200
            assert b"data: [DONE]" in reply.body
    for field, value in (("stream", "yes"), ("stream_options", [1])):
        payload = {"model": MODEL, "messages": [{"role": "user", "content": "x"}], field: value}
        bad = stack.raw(http("POST", "/v1/chat/completions", body=json.dumps(payload).encode()))
        assert bad.status == 400
        assert bad.json()["error"]["param"] == field


def test_usage_counts_when_the_client_hangs_up_right_after_done(make_stack) -> None:
    """Some clients close the connection the moment they read `[DONE]`."""
    stack = make_stack(require_key_on_loopback=True)
    key = stack.key("hasty")
    body = json.dumps(
        {"model": MODEL, "stream": True, "max_tokens": 20, "ignore_eos": True,
         "messages": [{"role": "user", "content": "x"}]}
    ).encode()  # fmt: skip
    for _ in range(5):
        with socket.create_connection((stack.host, stack.port)) as sock:
            sock.sendall(
                http("POST", "/v1/chat/completions", body=body,
                     headers={"Authorization": f"Bearer {key}"})
            )  # fmt: skip
            seen = b""
            while b"data: [DONE]" not in seen:
                seen += sock.recv(65536)
    record = next(k for k in stack.keys.list() if k.name == "hasty")
    assert record.requests == 5
    assert record.completion_tokens == 100
