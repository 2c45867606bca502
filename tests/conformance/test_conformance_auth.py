"""The key guards exactly /v1 (and /v2, /inference; 0.32 adds /cohere); everything else stays
open. CORS grants only the origins --allowed-origins lists, and a 401 carries no CORS header. On
real vLLM this starts its own engine (once for the module, real-std only).

The key comes through VLLM_API_KEY, as the appliance passes it (engine_key.py): vLLM feeds
`--api-key` or, without it, that variable to the same AuthenticationMiddleware (0.23
`entrypoints/openai/api_server.py`, 0.32 `entrypoints/serve/middleware/register.py`)."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from conformance_servers import client_for

KEY = "sk-conformance-key"
GOOD = "http://good.test"
EVIL = "http://evil.test"


@pytest.fixture(scope="module")
def keyed(module_launch):
    server = module_launch(
        "--allowed-origins", json.dumps([GOOD]), real_start=True, VLLM_API_KEY=KEY
    )
    server.api_key = KEY
    return server


def test_v1_needs_the_key(keyed) -> None:
    response = httpx.get(f"{keyed.url}/v1/models", timeout=10)
    assert response.status_code == 401
    assert response.json() == {"error": "Unauthorized"}
    wrong = httpx.get(
        f"{keyed.url}/v1/models", headers={"Authorization": "Bearer wrong"}, timeout=10
    )
    assert wrong.status_code == 401
    with pytest.raises(openai.AuthenticationError):
        client_for(keyed, api_key="wrong").models.list()
    assert client_for(keyed).models.list().data[0].id == keyed.model


def test_routes_outside_v1_stay_open(keyed) -> None:
    assert httpx.get(f"{keyed.url}/health", timeout=10).status_code == 200
    assert httpx.get(f"{keyed.url}/metrics", timeout=10).status_code == 200
    assert httpx.get(f"{keyed.url}/version", timeout=10).status_code == 200
    tokenized = httpx.post(f"{keyed.url}/tokenize", json={"prompt": "hello world"}, timeout=10)
    assert tokenized.status_code == 200
    assert tokenized.json()["count"] > 0


def test_cors_grants_only_the_listed_origin(keyed) -> None:
    evil = httpx.get(f"{keyed.url}/health", headers={"Origin": EVIL}, timeout=10)
    assert evil.status_code == 200
    assert "access-control-allow-origin" not in evil.headers
    good = httpx.get(f"{keyed.url}/health", headers={"Origin": GOOD}, timeout=10)
    assert good.headers["access-control-allow-origin"] == GOOD


def test_preflight_passes_the_key_check_and_refuses_a_foreign_origin(keyed) -> None:
    ask = {
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type",
    }
    url = f"{keyed.url}/v1/chat/completions"
    evil = httpx.options(url, headers={"Origin": EVIL, **ask}, timeout=10)
    assert evil.status_code == 400
    assert evil.text == "Disallowed CORS origin"
    assert "access-control-allow-origin" not in evil.headers
    good = httpx.options(url, headers={"Origin": GOOD, **ask}, timeout=10)
    assert good.status_code == 200  # OPTIONS skips the key check
    assert good.headers["access-control-allow-origin"] == GOOD


def test_a_401_carries_no_cors_header(keyed) -> None:
    response = httpx.get(f"{keyed.url}/v1/models", headers={"Origin": GOOD}, timeout=10)
    assert response.status_code == 401
    assert "access-control-allow-origin" not in response.headers
