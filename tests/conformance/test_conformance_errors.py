"""vLLM-shaped errors: {"error": {"message", "type", "param", "code"}} with the right status."""

from __future__ import annotations

import re

import httpx
import openai
import pytest
from conformance_servers import Server, client_for, vllm_version


def error_body(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) >= {"message", "type", "code"}
    assert body["error"]["code"] == response.status_code
    return body["error"]


def post(server: Server, path: str, payload: dict) -> httpx.Response:
    headers = {"Authorization": f"Bearer {server.api_key}"} if server.api_key else {}
    return httpx.post(f"{server.url}{path}", json=payload, headers=headers, timeout=60)


def test_bad_reasoning_level(server: Server, client) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(
            model=server.model,
            messages=[{"role": "user", "content": "hi"}],
            reasoning_effort="extreme",  # type: ignore[arg-type]
        )
    assert err.value.status_code == 400
    assert "reasoning_effort" in err.value.message


def test_unknown_model_is_404(server: Server) -> None:
    response = post(
        server,
        "/v1/chat/completions",
        {"model": "nope", "messages": [{"role": "user", "content": "x"}]},
    )
    assert response.status_code == 404
    error = error_body(response)
    assert error["type"] == "NotFoundError"
    assert error["param"] == "model"
    assert error["message"].startswith("The model `nope` does not exist.")
    # 0.32 names the served names (vllm/entrypoints/serve/engine/serving.py); 0.23.0 does not
    # (vllm/entrypoints/openai/engine/serving.py, _check_model).
    aliases = f"Valid aliases: {server.model}." in error["message"]
    assert aliases == (vllm_version(server) >= (0, 32))


def test_context_too_long(launch) -> None:
    # The simulators get a small window; a real vLLM is tested at the window it serves.
    server = launch("--max-model-len", "2048") if launch.simulated else launch()
    client = client_for(server)
    window = client.models.list().data[0].model_extra["max_model_len"]
    if launch.simulated:
        assert window == 2048
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(
            model=server.model, messages=[{"role": "user", "content": "word " * (window + 10)}]
        )
    assert f"maximum context length is {window} tokens" in err.value.message
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(
            model=server.model, messages=[{"role": "user", "content": "hi"}], max_tokens=window + 1
        )
    assert f"max_tokens={window + 1} cannot be greater than max_model_len=" in err.value.message


def prompt_near(server: Server, tokens: int) -> tuple[list[dict], int]:
    """Messages whose chat prompt is at most `tokens` long and close to it, and their length,
    measured with the server's /tokenize (each tokenizer cuts " word" its own way)."""

    def messages(words: int) -> list[dict]:
        return [{"role": "user", "content": "hi" + " word" * words}]

    def count(words: int) -> int:
        body = {"model": server.model, "messages": messages(words)}
        return int(post(server, "/tokenize", body).json()["count"])

    base = count(0)
    per_word = count(1) - base
    words = (tokens - base) // per_word
    return messages(words), count(words)


def test_max_tokens_equal_to_the_window(server: Server, client) -> None:
    """0.32 accepts it and clamps max_tokens to what the prompt leaves (max_input_tokens is the
    whole window, vllm/renderers/params.py); 0.23.0 reserves max_tokens out of the window for
    the prompt (max_input_tokens = max_total_tokens - max_output_tokens), so it is a 400."""
    window = client.models.list().data[0].model_extra["max_model_len"]
    messages, prompt_tokens = prompt_near(server, window - 12)
    assert window - 40 < prompt_tokens <= window - 12
    request = {
        "model": server.model,
        "messages": messages,
        "max_tokens": window,
        "extra_body": {"ignore_eos": True},
    }
    if vllm_version(server) >= (0, 32):
        reply = client.chat.completions.create(**request)
        assert reply.choices[0].finish_reason == "length"
        assert reply.usage.prompt_tokens == prompt_tokens
        assert reply.usage.completion_tokens == window - prompt_tokens
        return
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(**request)
    assert f"maximum context length is {window} tokens" in err.value.message
    assert f"you requested {window} output tokens" in err.value.message


def test_error_bodies_have_vllms_shape(server: Server) -> None:
    response = post(
        server,
        "/v1/chat/completions",
        {
            "model": server.model,
            "messages": [{"role": "user", "content": "x"}],
            "max_tokens": 10**9,
        },
    )
    assert response.status_code == 400
    assert error_body(response)["message"]


def test_version_is_a_release(launch) -> None:
    """/version names a real vLLM release: the simulator the one it imitates (0.23.0, the
    stepfun37 image's line), the real engine its own (0.32.0 here). (Its own simulator: the
    shared one's log is checked line by line by the start-up tests.)"""
    server = launch()
    version = httpx.get(f"{server.url}/version", timeout=10).json()["version"]
    assert re.fullmatch(r"\d+\.\d+\.\d+(\S*)", version)
    assert tuple(int(p) for p in version.split(".")[:2]) == vllm_version(server)[:2]
    if server.simulated:
        assert version == "0.23.0"


def test_unknown_route_is_fastapi_404(server: Server) -> None:
    response = httpx.get(f"{server.url}/no/such/route", timeout=10)
    assert response.status_code == 404
    assert response.json() == {"detail": "Not Found"}


MISTYPED = [
    pytest.param({"stream": [1]}, "stream", id="stream-list"),
    pytest.param({"stream_options": "usage"}, "stream_options", id="stream_options-str"),
    pytest.param({"temperature": "hot"}, "temperature", id="temperature-str"),
    pytest.param({"n": 1.5}, "n", id="n-float"),
    pytest.param({"messages": [{"role": {"x": 1}, "content": "hi"}]}, "messages", id="role-dict"),
    pytest.param(
        {"messages": [{"role": "assistant", "content": "a", "tool_calls": "x"}]},
        "toolcall",
        id="tool_calls-str",
    ),
    pytest.param(
        {"messages": [{"role": "assistant", "content": "a", "tool_calls": [1]}]},
        "toolcall",
        id="tool_call-int",
    ),
    pytest.param(
        {"messages": [{"role": "tool", "content": "a", "name": {}}]}, "messages", id="name-dict"
    ),
]


@pytest.mark.parametrize(("change", "field"), MISTYPED)
def test_a_mistyped_field_is_a_400_naming_it(server: Server, change: dict, field: str) -> None:
    """pydantic rejects these in vLLM's request model: a client error, never a 500. The message
    is FastAPI's "1 validation error:" list in both versions; `param` is the field's location
    ("body.temperature") in 0.32 (handlers/validation.py, clean_loc_for_param) and null in 0.23.0
    (vllm/entrypoints/serve/utils/server_utils.py sets it only for VLLMValidationError)."""
    payload = {"model": server.model, "messages": [{"role": "user", "content": "hi"}], **change}
    response = post(server, "/v1/chat/completions", payload)
    assert response.status_code == 400, response.text
    error = error_body(response)
    # "toolcall": the simulator names messages.0.tool_calls, 0.32 the tool call's param class.
    assert (
        field in error["message"].replace("_", "").lower()
        if field == "toolcall"
        else (field in error["message"])
    )
    if error["type"] == "BadRequestError":  # 0.32 checks tool calls in its own code, after pydantic
        assert vllm_version(server) >= (0, 32)
        return
    assert error["type"] == "Bad Request"
    assert re.match(r"\d+ validation errors?:\n", error["message"])
    if vllm_version(server) >= (0, 32):
        assert error["param"].startswith("body")
    elif field == "stream_options":  # 0.23's validate_stream_options names its parameter
        assert error["param"] == "stream_options"  # (seen on an H200 with real 0.23.0)
    else:
        assert error["param"] is None


def test_a_custom_role_is_accepted(server: Server, client) -> None:
    """Any string is a role: vLLM's ChatCompletionMessageParam ends with
    CustomChatCompletionMessageParam (`role: Required[str]`, vllm/entrypoints/chat_utils.py)."""
    reply = client.chat.completions.create(
        model=server.model,
        messages=[
            {"role": "narrator", "content": "The scene is a kitchen."},
            {"role": "user", "content": "hi"},
        ],
        reasoning_effort="low",
        max_tokens=20,
    )
    assert reply.usage.completion_tokens > 0


@pytest.mark.parametrize("level", ["none", "minimal", "xhigh", "max"])
def test_the_newer_reasoning_levels_are_accepted(server: Server, client, level: str) -> None:
    """ChatCompletionRequest.reasoning_effort is a Literal of none, minimal, low, medium, high,
    xhigh, max in 0.23.0 and 0.32 (vllm/entrypoints/openai/chat_completion/protocol.py)."""
    reply = client.chat.completions.create(
        model=server.model,
        messages=[{"role": "user", "content": "hi"}],
        reasoning_effort=level,  # type: ignore[arg-type]
        max_tokens=20,
    )
    assert reply.usage.completion_tokens > 0


def test_a_lone_surrogate_is_a_400_on_both_routes(server: Server) -> None:
    """JSON allows "\\ud800"; no tokenizer takes it. Real vLLM 0.32 answers the tokenizer's
    TypeError as a 400 ("TextEncodeInput must be Union[...]"); never a 500."""
    headers = {"Content-Type": "application/json"}
    if server.api_key:
        headers["Authorization"] = f"Bearer {server.api_key}"
    bodies = {
        "/v1/chat/completions": '{"messages": [{"role": "user", "content": "a\\ud800b"}]}',
        "/v1/completions": '{"prompt": "a\\ud800b", "stream": true}',
    }
    for path, body in bodies.items():
        response = httpx.post(f"{server.url}{path}", content=body, headers=headers, timeout=30)
        assert response.status_code == 400, (path, response.text)
        message = error_body(response)["message"]
        assert "Invalid text" in message if server.simulated else message
