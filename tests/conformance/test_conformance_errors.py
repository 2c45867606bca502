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
