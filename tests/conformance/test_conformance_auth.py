"""--api-key guards exactly /v1 (and /v2, /inference; 0.32 adds /cohere); everything else stays
open. On real vLLM this starts its own engine with the key (once for the module, real-std only)."""

from __future__ import annotations

import httpx
import openai
import pytest
from conformance_servers import client_for


@pytest.fixture(scope="module")
def keyed(module_launch):
    return module_launch("--api-key", "sk-conformance-key", real_start=True)


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
