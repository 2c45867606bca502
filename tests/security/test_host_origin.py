"""DNS rebinding, foreign origins and reflected CORS, tried on a running appliance (UI + gateway).

The attack of issue 12, as curl sent it on the landed code: a page whose name resolves to
127.0.0.1 posts to `/gradio_api/call/on_create` with `Host: evil.test` and reads the new key back.
Here every Gradio event the page has (create key, share on LAN, owner login, UI on LAN, export,
start/stop the engine...) is sent that way, and with a foreign Origin, and without the
per-install secret: none runs. What would change shows it: the key list, the settings file, the
engine's state and the history stay as they were.
"""

from __future__ import annotations

import json
import secrets
import time
from typing import Any

import httpx
import pytest
from fixtures.appliance import Appliance

pytestmark = pytest.mark.timeout(300)

EVIL_HOSTS = ("evil.test", "evil.test:7860", "127.0.0.1.nip.io", "attacker.localhost.evil.test")
EVIL_ORIGINS = ("http://evil.test", "null", "http://127.0.0.2:7860", "file://")


def ui_host(app: Appliance) -> str:
    return f"127.0.0.1:{app.ui_port}"


def owner(app: Appliance) -> httpx.Client:
    """The owner's browser: the cookie `step-station open` gives."""
    return httpx.Client(base_url=app.base, headers={"Cookie": app.cookie}, timeout=30)


def dependencies(app: Appliance) -> list[dict[str, Any]]:
    with owner(app) as client:
        config = client.get("/config")
    assert config.status_code == 200, config.text
    deps = config.json()["dependencies"]
    assert len(deps) > 10, deps  # the page's events: chat, model, dashboard, sharing
    return deps


def snapshot(app: Appliance) -> dict[str, Any]:
    """What an event that ran would have changed."""
    home = app.home
    keys = home / "data" / "keys.json"
    settings = home / "config" / "settings.toml"
    history = home / "data" / "history.sqlite3"
    return {
        "keys": keys.read_text() if keys.exists() else "",
        "settings": settings.read_text() if settings.exists() else "",
        "login": sorted(p.name for p in (home / "config").iterdir()),
        "history_size": history.stat().st_size if history.exists() else 0,
        "engine": (app.health() or {}).get("engine"),
        "prompt_tokens": app.gauge("vllm:prompt_tokens_total"),
    }


def join(fn_index: int) -> dict[str, Any]:
    return {
        "data": [None] * 8,
        "event_data": None,
        "fn_index": fn_index,
        "trigger_id": None,
        "session_hash": secrets.token_hex(6),
    }


@pytest.fixture
def app(module_appliance: Appliance) -> Appliance:
    return module_appliance


def test_rebinding_by_host_header_runs_no_ui_event(app: Appliance) -> None:
    before = snapshot(app)
    deps = dependencies(app)
    named = [d["api_name"] for d in deps if isinstance(d.get("api_name"), str)]
    assert "on_create" in " ".join(named) or named, named
    with httpx.Client(base_url=app.base, timeout=30) as client:
        for host in EVIL_HOSTS:
            # the exact attack, then every event by fn_index, the way the page sends them
            for api_name in named:
                reply = client.post(
                    f"/gradio_api/call/{api_name}",
                    json={"data": ["rebind-test", None]},
                    headers={"Host": host, "Origin": f"http://{host}"},
                )
                assert reply.status_code == 403, (host, api_name, reply.text)
                assert reply.json()["error"]["code"] == "foreign_host"
                assert "access-control-allow-origin" not in reply.headers
            for dep in deps:
                # even with the owner's cookie (a rebinding page never has it: it is another site)
                reply = client.post(
                    "/gradio_api/queue/join",
                    json=join(dep["id"]),
                    headers={"Host": host, "Cookie": app.cookie},
                )
                assert reply.status_code == 403, (host, dep["id"], reply.text)
            for path in ("/", "/config", "/gradio_api/queue/data", "/gradio_api/info"):
                reply = client.get(path, headers={"Host": host, "Cookie": app.cookie})
                assert reply.status_code == 403, (host, path)
    assert snapshot(app) == before


def test_a_foreign_origin_runs_no_ui_event_even_with_the_owners_cookie(app: Appliance) -> None:
    before = snapshot(app)
    deps = dependencies(app)
    with httpx.Client(base_url=app.base, timeout=30) as client:
        for origin in EVIL_ORIGINS:
            for dep in deps:
                reply = client.post(
                    "/gradio_api/queue/join",
                    json=join(dep["id"]),
                    headers={"Origin": origin, "Cookie": app.cookie},
                )
                assert reply.status_code == 403, (origin, dep["id"], reply.text)
                assert reply.json()["error"]["code"] == "foreign_origin"
            # results are read with GET: refused too
            reply = client.get(
                "/gradio_api/queue/data",
                params={"session_hash": "x"},
                headers={"Origin": origin, "Cookie": app.cookie},
            )
            assert reply.status_code == 403
            preflight = client.options(
                "/gradio_api/queue/join",
                headers={
                    "Origin": origin,
                    "Access-Control-Request-Method": "POST",
                    "Access-Control-Request-Headers": "content-type",
                },
            )
            assert preflight.status_code == 403
            assert not any(h.startswith("access-control-allow") for h in preflight.headers)
    assert snapshot(app) == before


def test_without_the_install_secret_the_ui_is_locked(app: Appliance) -> None:
    """Another local user reaches 127.0.0.1 too: without the secret nothing but /healthz."""
    before = snapshot(app)
    deps = dependencies(app)
    with httpx.Client(base_url=app.base, timeout=30) as stranger:
        page = stranger.get("/", headers={"Accept": "text/html"})
        assert page.status_code == 401
        assert "step-station open" in page.text  # says how the owner opens it
        assert app.token not in page.text
        for dep in deps:
            reply = stranger.post("/gradio_api/queue/join", json=join(dep["id"]))
            assert reply.status_code == 401, (dep["id"], reply.text)
            assert reply.json()["error"]["code"] == "ui_token_required"
        for path in ("/config", "/gradio_api/queue/data", "/gradio_api/startup-events"):
            assert stranger.get(path).status_code == 401, path
        upload = stranger.post("/gradio_api/upload", files={"files": ("a.png", b"x")})
        assert upload.status_code == 401
        wrong = stranger.get("/", params={"token": "not-" + app.token[4:]})
        assert wrong.status_code == 401
        assert "set-cookie" not in wrong.headers
        forged = stranger.get(
            "/config", headers={"Cookie": f"step-station-ui-{app.ui_port}={app.token}"}
        )
        assert forged.status_code == 401  # the cookie is derived, not the secret itself
        assert stranger.get("/healthz").status_code == 200  # a health check still works
    assert snapshot(app) == before
    # The secret is the owner's alone.
    assert (app.home / "config" / "ui-token").stat().st_mode & 0o077 == 0


def test_the_secret_in_the_address_sets_a_strict_cookie_and_leaves_the_address(
    app: Appliance,
) -> None:
    with httpx.Client(base_url=app.base, timeout=30) as browser:
        first = browser.get("/", params={"token": app.token, "__theme": "dark"})
        assert first.status_code == 303
        assert first.headers["location"] == "/?__theme=dark"  # the secret leaves the address bar
        cookie = first.headers["set-cookie"]
        for attribute in ("HttpOnly", "SameSite=Strict", "Path=/"):
            assert attribute in cookie
        assert app.token not in cookie
        page = browser.get("/")  # the client kept the cookie
        assert page.status_code == 200
        assert "<html" in page.text.lower()
        # no other site may frame the UI (clickjacking), and no Referer leaves it; on the page,
        # on Gradio's own routes, and on the locked page alike
        locked = httpx.get(app.base, headers={"Accept": "text/html"}, timeout=30)
        assert locked.status_code == 401
        for reply in (page, browser.get("/config"), locked):
            assert "frame-ancestors 'none'" in reply.headers["content-security-policy"]
            assert reply.headers["x-frame-options"] == "DENY"
            assert reply.headers["referrer-policy"] == "no-referrer"
            assert reply.headers["x-content-type-options"] == "nosniff"


def test_only_the_routes_the_page_uses_are_open(app: Appliance) -> None:
    """With the owner's cookie: the named-API routes of every event are gone, the page's stay."""
    deps = dependencies(app)
    with owner(app) as client:
        for dep in deps:
            name = dep.get("api_name")
            if not isinstance(name, str):
                continue
            for route in (f"/gradio_api/call/{name}", f"/gradio_api/run/{name}"):
                reply = client.post(route, json={"data": []})
                assert reply.status_code == 404, (route, reply.text)
        for path in (
            "/gradio_api/info",
            "/gradio_api/openapi.json",
            "/gradio_api/runs",
            "/gradio_api/token",
            "/gradio_api/proxy=http://127.0.0.1:1/",
            "/gradio_api/mcp/schema",
            "/monitoring",
            "/openapi.json",
            "/docs",
        ):
            assert client.get(path).status_code == 404, path
        assert client.get("/").status_code == 200
        assert client.get("/config").status_code == 200
        assert client.get("/theme.css").status_code == 200


def test_the_gateway_refuses_foreign_hosts_and_origins_and_grants_no_cors(
    app: Appliance,
) -> None:
    base = f"http://127.0.0.1:{app.api_port}"
    body = {
        "model": "step3p7-flash",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 4,
    }
    before = app.gauge("vllm:prompt_tokens_total")
    with httpx.Client(base_url=base, timeout=30) as client:
        for host in EVIL_HOSTS:
            reply = client.post("/v1/chat/completions", json=body, headers={"Host": host})
            assert reply.status_code == 403, (host, reply.text)
            assert reply.json()["error"]["code"] == "foreign_host"
            assert client.get("/v1/models", headers={"Host": host}).status_code == 403
        for origin in EVIL_ORIGINS:
            reply = client.post("/v1/chat/completions", json=body, headers={"Origin": origin})
            assert reply.status_code == 403, (origin, reply.text)
            assert reply.json()["error"]["code"] == "foreign_origin"
            models = client.get("/v1/models", headers={"Origin": origin})
            assert models.status_code == 403  # a page can't even read the model list
            preflight = client.options(
                "/v1/chat/completions",
                headers={"Origin": origin, "Access-Control-Request-Method": "POST"},
            )
            assert not any(h.startswith("access-control-allow") for h in preflight.headers)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:  # the metrics would show a prompt within a moment
            assert app.gauge("vllm:prompt_tokens_total") == before
            time.sleep(0.5)
        # The real client, on a name this listener serves, still works.
        for host in (f"127.0.0.1:{app.api_port}", f"localhost:{app.api_port}"):
            ok = client.post("/v1/chat/completions", json=body, headers={"Host": host})
            assert ok.status_code == 200, ok.text
            assert "access-control-allow-origin" not in ok.headers


def test_an_owner_added_name_and_origin_are_accepted(appliance: Any) -> None:
    """A reverse proxy's name (ui.allowed_hosts) passes; nothing else does."""
    app = appliance(
        settings={
            "ui": {"allowed_hosts": "station.example", "allowed_origins": "https://station.example"}
        }
    )
    with owner(app) as client:
        named = client.get("/config", headers={"Host": "station.example"})
        assert named.status_code == 200
        proxied = client.post(
            "/gradio_api/queue/join",
            json={"fn_index": -1},
            headers={"Host": "station.example", "Origin": "https://station.example"},
        )
        assert proxied.status_code != 403  # reaches Gradio (which judges the body)
        other = client.get("/config", headers={"Host": "other.example"})
        assert other.status_code == 403
        assert "ui.allowed_hosts" in json.loads(other.text)["error"]["message"]
