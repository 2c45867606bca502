"""vLLM-shaped errors: {"error": {"message", "type", "param", "code"}} with the right status."""

from __future__ import annotations

import httpx
import openai
import pytest
from conformance_servers import Server, client_for


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
    assert "nope" in error_body(response)["message"]


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
            model=server.model, messages=[{"role": "user", "content": "hi"}], max_tokens=window
        )
    assert f"maximum context length is {window} tokens" in err.value.message


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
    pytest.param({"messages": [{"role": "lord", "content": "hi"}]}, "messages", id="role-unknown"),
    pytest.param(
        {"messages": [{"role": "assistant", "content": "a", "tool_calls": "x"}]},
        "messages",
        id="tool_calls-str",
    ),
    pytest.param(
        {"messages": [{"role": "assistant", "content": "a", "tool_calls": [1]}]},
        "messages",
        id="tool_call-int",
    ),
    pytest.param(
        {"messages": [{"role": "tool", "content": "a", "name": {}}]}, "messages", id="name-dict"
    ),
]


@pytest.mark.parametrize(("change", "field"), MISTYPED)
def test_a_mistyped_field_is_a_400_naming_it(server: Server, change: dict, field: str) -> None:
    """pydantic rejects these in vLLM's request model: a client error, never a 500."""
    payload = {"model": server.model, "messages": [{"role": "user", "content": "hi"}], **change}
    response = post(server, "/v1/chat/completions", payload)
    assert response.status_code == 400, response.text
    assert field in error_body(response)["message"]


def test_a_lone_surrogate_is_a_400_on_both_routes(server: Server) -> None:
    if not server.simulated:
        pytest.skip("the simulator's answer to text the tokenizer cannot take")
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
        assert "Invalid text" in error_body(response)["message"]
