"""Fuzzing the gateway with hypothesis, in front of the real simulator.

Two generators, both over real sockets:
- raw requests: methods, targets (the five routes mutated: dot segments, encodings, slashes,
  case, control bytes, query strings, absolute forms), headers (keys right, wrong, odd schemes,
  duplicated, huge, as Bearer or x-api-key) and bodies (bytes, JSON of any shape), always
  correctly framed;
- request bodies for the chat and completions routes built from the OpenAI fields with values of
  every type (models, messages, stream, stream_options, max_tokens, reasoning_effort, images, ...);
- request bodies for the agent routes: the Responses API's fields (input items and parts,
  instructions, tools, reasoning, max_output_tokens) and the Messages API's (content blocks with
  base64 or URL images, tool_use / tool_result, system, tools, thinking, stop_sequences).

What must hold for every case: an HTTP answer comes back; no 5xx is the gateway's own (5xx from
the engine carry `Via: 1.1 step-station` and are passed on as they are); a 404 is the gateway's
OpenAI-shaped error (Anthropic-shaped on /v1/messages); and afterwards the gateway still
serves. `GATEWAY_FUZZ_EXAMPLES` sets the
number of cases per generator (default 300); `GATEWAY_FUZZ_REPORT` names a JSON file for counts.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import pytest
from gateway_kit import MODEL, free_port, png_data_url, raw_request, start_gateway
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as s

from appliance import settings as st
from appliance.gateway import FixedEngine

pytestmark = pytest.mark.timeout(1800)

EXAMPLES = int(os.environ.get("GATEWAY_FUZZ_EXAMPLES", "300"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    derandomize=os.environ.get("GATEWAY_FUZZ_RANDOM") != "1",
)
ROUTES = ["/v1/models", "/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/messages"]
OTHER = ["/metrics", "/tokenize", "/invocations", "/sleep", "/wake_up", "/health", "/pause"]
SEGMENTS = ["..", ".", "%2e%2e", "%2E", "", "%2f", "%5c", "\\", "v1", "metrics", "models", "%00"]
KEY = {"value": ""}
STATS: Counter[str] = Counter()


@pytest.fixture
def fuzz_stack(simulator):
    sim = simulator(tokens_per_s=100000, ttft_ms=0)
    cfg = st.with_changes(
        st.Settings(),
        {
            "gateway.port": free_port(),
            "gateway.require_key_on_loopback": True,
            "gateway.max_body_mb": 1,
            "gateway.per_key_concurrency": 0,
            "gateway.per_key_requests_per_minute": 0,
        },
    )
    stack = start_gateway(cfg, FixedEngine(sim.url, MODEL), sim.url)
    # Failed keys from one address lock it out (429); the fuzzer is one address, so a lockout is
    # an expected answer, but keep it short so the run explores more than lockouts.
    stack.gateway.app.throttle.lockout_s = 0.2
    KEY["value"] = stack.key("fuzzer")
    yield stack
    stack.gateway.stop()
    report = os.environ.get("GATEWAY_FUZZ_REPORT")
    if report:
        Path(report).write_text(json.dumps(dict(STATS), indent=2, sort_keys=True))


# ------------------------------------------------------------------------------- strategies

json_values = s.recursive(
    s.none()
    | s.booleans()
    | s.integers()
    | s.floats(allow_nan=False)
    | s.text(max_size=30)
    | s.sampled_from(["\ud800", "x\udfff", "\x00", "\u2028"]),  # lone surrogates, controls
    lambda inner: (
        s.lists(inner, max_size=4) | s.dictionaries(s.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=12,
)

targets = s.one_of(
    s.sampled_from(ROUTES + OTHER),
    s.builds(
        lambda base, segs, tail: base + "/" + "/".join(segs) + tail,
        s.sampled_from(["", "/v1", "/v1/models", "/v1/chat", "//v1"]),
        s.lists(s.sampled_from(SEGMENTS), max_size=4),
        s.sampled_from(["", "/", "?a=1", "/metrics", "models", "completions", "#x", ";p"]),
    ),
    s.sampled_from(ROUTES).map(lambda r: r.upper()),
    s.sampled_from(ROUTES).map(lambda r: "http://127.0.0.1" + r),
    s.text(
        alphabet=s.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters="#?"),
        max_size=40,
    ).map(lambda t: "/" + t),
)

methods = s.sampled_from(["GET", "POST", "HEAD", "OPTIONS", "PUT", "DELETE", "PATCH", "TRACE"])


def _auth(choice: str) -> dict[str, str]:
    key = KEY["value"]
    return {
        "good": {"Authorization": f"Bearer {key}"},
        "lower": {"authorization": f"bearer {key}"},
        "none": {},
        "wrong": {"Authorization": "Bearer sk-step-00000000wrongwrongwrong"},
        "basic": {"Authorization": f"Basic {key}"},
        "empty": {"Authorization": "Bearer "},
        "huge": {"Authorization": "Bearer " + "A" * 8000},
        "prefix": {"Authorization": f"Bearer {key[:16]}"},
        "x-api-key": {"x-api-key": key},
        "x-api-key wrong": {"x-api-key": "sk-step-00000000wrongwrongwrong"},
        "wrong bearer, good x-api-key": {
            "Authorization": "Bearer sk-step-wrong",
            "x-api-key": key,
        },
    }[choice]


auths = s.sampled_from(["good", "good", "good", "lower", "none", "wrong", "basic", "empty", "huge",
                        "prefix", "x-api-key", "x-api-key wrong",
                        "wrong bearer, good x-api-key"])  # fmt: skip

bodies = s.one_of(
    s.just(b""),
    s.binary(max_size=300),
    json_values.map(lambda v: json.dumps(v).encode()),
)

messages = s.one_of(
    json_values,
    s.lists(
        s.fixed_dictionaries(
            {"role": s.sampled_from(["user", "system", "assistant", "tool", "x"]) | json_values},
            optional={
                "content": s.text(max_size=40)
                | json_values
                | s.just([{"type": "image_url", "image_url": {"url": png_data_url(8, 8)}}])
                | s.just([{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAA"}}])
                | s.just([{"type": "text", "text": "hi"}]),
            },
        ),
        max_size=3,
    ),
)

openai_bodies = s.fixed_dictionaries(
    {},
    optional={
        "model": s.sampled_from([MODEL, MODEL, MODEL, "gpt-4", "", MODEL.upper()]) | json_values,
        "messages": messages,
        "prompt": s.text(max_size=40) | json_values,
        "stream": s.booleans() | json_values,
        "stream_options": s.fixed_dictionaries({}, optional={"include_usage": json_values})
        | json_values,
        "max_tokens": s.integers(min_value=-5, max_value=64) | json_values,
        "reasoning_effort": s.sampled_from(["low", "medium", "high", "max"]) | json_values,
        "temperature": s.floats(allow_nan=False, allow_infinity=False) | json_values,
        "n": s.integers(min_value=-1, max_value=3),
        "tools": json_values,
    },
)


image_urls = s.sampled_from(
    [png_data_url(8, 8), "data:image/png;base64,AAA", "http://127.0.0.1:1/x.png", ""]
)
responses_parts = s.one_of(
    s.fixed_dictionaries({"type": s.just("input_text"), "text": s.text(max_size=20)}),
    s.fixed_dictionaries({"type": s.just("input_image"), "image_url": image_urls | json_values}),
    s.dictionaries(s.sampled_from(["type", "text", "image_url", "file_id"]), json_values,
                   max_size=3),
)  # fmt: skip
responses_items = s.one_of(
    s.fixed_dictionaries(
        {"role": s.sampled_from(["user", "system", "assistant", "developer"]) | json_values},
        optional={"type": s.just("message"),
                  "content": s.text(max_size=30) | s.lists(responses_parts, max_size=3)},
    ),
    s.fixed_dictionaries(
        {"type": s.just("function_call"), "call_id": s.text(max_size=8),
         "name": s.text(max_size=8), "arguments": s.text(max_size=20)}
    ),
    s.fixed_dictionaries(
        {"type": s.just("function_call_output"), "call_id": s.text(max_size=8),
         "output": s.text(max_size=20) | s.lists(responses_parts, max_size=2)}
    ),
    json_values,
)  # fmt: skip
responses_optional = {
    "model": s.sampled_from([MODEL, MODEL, "gpt-5", ""]) | json_values,
    "input": s.text(max_size=40) | s.lists(responses_items, max_size=3) | json_values,
    "instructions": s.text(max_size=30) | json_values,
    "stream": s.booleans() | json_values,
    "max_output_tokens": s.integers(min_value=-5, max_value=64) | json_values,
    "reasoning": s.fixed_dictionaries({}, optional={"effort": s.sampled_from(
        ["low", "medium", "high", "max"]) | json_values}) | json_values,
    "tools": s.just([{"type": "function", "name": "get_weather",
                      "parameters": {"type": "object", "properties": {}}}]) | json_values,
    "tool_choice": s.sampled_from(["auto", "none", "required"]) | json_values,
    "previous_response_id": s.text(max_size=10),
    "background": s.booleans(),
    "store": s.booleans(),
}  # fmt: skip
responses_bodies = s.one_of(
    s.fixed_dictionaries({}, optional=responses_optional),
    # mostly well-formed, so that answers (and their streams and usage) are exercised too
    s.fixed_dictionaries(
        {"input": s.text(min_size=1, max_size=20) | s.lists(responses_items, min_size=1,
                                                            max_size=2),
         "max_output_tokens": s.integers(min_value=1, max_value=32)},
        optional={k: v for k, v in responses_optional.items()
                  if k not in ("input", "max_output_tokens", "model")},
    ),
)  # fmt: skip
image_sources = s.one_of(
    s.just({"type": "base64", "media_type": "image/png", "data": png_data_url(8, 8)[22:]}),
    s.just({"type": "base64", "media_type": "image/png", "data": "AAA"}),
    s.just({"type": "url", "url": "http://127.0.0.1:1/x.png"}),
    json_values,
)
anthropic_blocks = s.one_of(
    s.fixed_dictionaries({"type": s.just("text"), "text": s.text(max_size=20) | json_values}),
    s.fixed_dictionaries({"type": s.just("image"), "source": image_sources}),
    s.fixed_dictionaries({"type": s.just("tool_use"), "id": s.text(max_size=8),
                          "name": s.text(max_size=8), "input": json_values}),
    s.fixed_dictionaries({"type": s.just("tool_result"), "tool_use_id": s.text(max_size=8),
                          "content": s.text(max_size=20) | s.lists(
                              s.fixed_dictionaries({"type": s.just("image"),
                                                    "source": image_sources}), max_size=2)}),
    s.fixed_dictionaries({"type": s.just("thinking"), "thinking": s.text(max_size=10),
                          "signature": s.text(max_size=8)}),
    json_values,
)  # fmt: skip
messages_optional = {
    "model": s.sampled_from([MODEL, MODEL, "claude-sonnet-4-5", ""]) | json_values,
    "max_tokens": s.integers(min_value=-5, max_value=64) | json_values,
    "messages": s.lists(
        s.fixed_dictionaries(
            {"role": s.sampled_from(["user", "assistant", "system"]) | json_values},
            optional={"content": s.text(max_size=30) | s.lists(anthropic_blocks, max_size=3)},
        ),
        max_size=3,
    ) | json_values,
    "system": s.text(max_size=20) | json_values,
    "stream": s.booleans() | json_values,
    "tools": s.just([{"name": "get_weather", "input_schema": {"type": "object"}}])
    | json_values,
    "tool_choice": s.sampled_from([{"type": "auto"}, {"type": "any"}]) | json_values,
    "thinking": s.sampled_from([{"type": "enabled", "budget_tokens": 1024},
                                {"type": "disabled"}]) | json_values,
    "stop_sequences": s.lists(s.text(max_size=5), max_size=6) | json_values,
    "temperature": s.floats(allow_nan=False, allow_infinity=False) | json_values,
}  # fmt: skip
messages_bodies = s.one_of(
    s.fixed_dictionaries({}, optional=messages_optional),
    s.fixed_dictionaries(
        {"model": s.just(MODEL), "max_tokens": s.integers(min_value=1, max_value=32),
         "messages": s.lists(s.fixed_dictionaries(
             {"role": s.just("user"),
              "content": s.text(min_size=1, max_size=20) | s.lists(anthropic_blocks, min_size=1,
                                                                     max_size=2)}),
             min_size=1, max_size=2)},
        optional={k: v for k, v in messages_optional.items()
                  if k not in ("model", "max_tokens", "messages")},
    ),
)  # fmt: skip


# ---------------------------------------------------------------------------------- checks


def _send(stack, method: str, target: str, headers: dict[str, str], body: bytes):
    lines = [f"{method} {target} HTTP/1.1", "Host: 127.0.0.1", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    lines.append(f"Content-Length: {len(body)}")
    data = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1", "replace") + body
    return raw_request(stack.host, stack.port, data, timeout=30)


def _check(reply, where: str) -> None:
    assert reply.status, f"no HTTP answer for {where}: {reply.raw[:200]!r}"
    STATS[str(reply.status)] += 1
    engine_said = reply.headers.get("via") == "1.1 step-station"
    if reply.status >= 500:
        STATS["5xx from the engine" if engine_said else "5xx from the gateway"] += 1
        assert engine_said, f"gateway 5xx for {where}: {reply.body[:300]!r}"
    json_error = reply.headers.get("content-type") == "application/json" and reply.body
    if not engine_said and json_error:
        error = json.loads(reply.body)["error"]  # the gateway's errors are OpenAI-shaped
        assert {"message", "type", "code"} <= set(error), where
    if reply.status == 404 and not engine_said and reply.body:
        assert json.loads(reply.body)["error"]["code"] in ("not_found", "model_not_found"), where
    if where.startswith("POST /v1/messages ") and not engine_said and json_error:
        assert json.loads(reply.body)["type"] == "error", where  # Anthropic's shape


def _still_serving(stack) -> None:
    reply = raw_request(
        stack.host,
        stack.port,
        b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
        + f"Authorization: Bearer {KEY['value']}\r\n\r\n".encode(),
    )
    assert reply.status in (200, 429)


def test_fuzz_raw_requests(fuzz_stack) -> None:
    @FUZZ
    @given(method=methods, target=targets, auth=auths, body=bodies, extra=s.booleans())
    def case(method: str, target: str, auth: str, body: bytes, extra: bool) -> None:
        STATS["cases raw"] += 1
        headers = {**_auth(auth), "Content-Type": "application/json"}
        if extra:
            headers["X-Forwarded-For"] = "10.9.9.9"
            headers["Accept-Encoding"] = "gzip"
        try:
            reply = _send(fuzz_stack, method, target, headers, body)
        except UnicodeEncodeError:
            return
        _check(reply, f"{method} {target!r} auth={auth} body={body[:60]!r}")

    case()
    _still_serving(fuzz_stack)


def test_fuzz_openai_bodies(fuzz_stack) -> None:
    @FUZZ
    @given(route=s.sampled_from(ROUTES[1:]), payload=openai_bodies)
    def case(route: str, payload: dict) -> None:
        STATS["cases body"] += 1
        body = json.dumps(payload).encode()
        reply = _send(fuzz_stack, "POST", route, _auth("good"), body)
        _check(reply, f"POST {route} {body[:200]!r}")

    case()
    _still_serving(fuzz_stack)


def test_fuzz_agent_bodies(fuzz_stack) -> None:
    @FUZZ
    @given(
        route_payload=s.one_of(
            s.tuples(s.just("/v1/responses"), responses_bodies),
            s.tuples(s.just("/v1/messages"), messages_bodies),
        ),
        auth=s.sampled_from(["good", "x-api-key"]),
    )
    def case(route_payload: tuple[str, dict], auth: str) -> None:
        route, payload = route_payload
        STATS["cases agent body"] += 1
        body = json.dumps(payload).encode()
        reply = _send(fuzz_stack, "POST", route, _auth(auth), body)
        STATS[f"{route} {reply.status}"] += 1
        _check(reply, f"POST {route} {body[:200]!r}")

    case()
    _still_serving(fuzz_stack)


def test_framing_edge_cases(fuzz_stack) -> None:
    """Malformed framing the generators avoid: the server answers or closes, never hangs or 5xx."""
    key = KEY["value"]
    cases = [
        b"GARBAGE\r\n\r\n",
        b"GET /v1/models HTTP/9.9\r\nHost: 127.0.0.1\r\n\r\n",
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: -1\r\n\r\n",
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: abc\r\n\r\n",
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n"
        b"Content-Length: 5\r\n\r\n0\r\n\r\n",
        b"GET /v1/models HTTP/1.1\r\n" + b"X-Big: " + b"a" * 70000 + b"\r\n\r\n",
        b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer " + key.encode()
        + b"\r\nContent-Length: 100000000000\r\n\r\n{}",
    ]  # fmt: skip
    for data in cases:
        try:
            reply = raw_request(fuzz_stack.host, fuzz_stack.port, data + b"", timeout=10)
        except (TimeoutError, ConnectionError):
            continue  # the server closed the connection: allowed for malformed framing
        if reply.status:
            STATS[str(reply.status)] += 1
            assert reply.status < 500 or reply.headers.get("via"), data[:80]
    _still_serving(fuzz_stack)
