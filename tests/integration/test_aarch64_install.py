"""Step Station on aarch64 (the DGX Station's Grace CPU), emulated here with qemu-user-static.

scripts/test_aarch64.sh runs these (they skip in the ordinary suite: tens of minutes under
emulation on a small machine). It builds an arm64 Debian root with debootstrap, once, and gives
it here as an arm64 image (STEP_STATION_ARM64_BASE). Every program below runs as aarch64 code:
the installer's Python, pip and the wheels it picks, the appliance, Gradio, the simulator.

- installer/install.sh --demo installs as an ordinary user, `step-station up --demo` answers
  /healthz with the engine ready, and a chat through the gateway, with an API key, returns text
  (the official openai SDK, from this host; the container shares the host's network);
- the installer names a dependency that has no aarch64 wheel and says why the install failed
  (psutil forced to build from source, in a root with no compiler);
- docker/Dockerfile builds for linux/arm64 and the image starts `up --demo`;
- a real arm64-only image in the local registry is refused by the engine pull on this amd64
  host before pulling, and accepted for linux/arm64.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tarfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import docker  # noqa: TID251 - the test drives containers directly
import docker.errors  # noqa: TID251
import httpx
import openai
import pytest
from fixtures.sim import free_port

from appliance.engine.docker_runtime import DockerRuntime
from appliance.errors import ImagePullError

pytestmark = [
    pytest.mark.docker,
    pytest.mark.skipif(
        not os.environ.get("STEP_STATION_ARM64_BASE"),
        reason="aarch64 emulation tests: run scripts/test_aarch64.sh (it builds the arm64 root "
        "and sets STEP_STATION_ARM64_BASE)",
    ),
]

REPO = Path(__file__).resolve().parents[2]
HOST_CA = Path("/etc/ssl/certs/ca-certificates.crt")
OWNER_UID = 1000
HOME = "/home/owner"
SRC = f"{HOME}/src"
BIN = f"{HOME}/.local/bin/step-station"
# Everything is emulated: a start that takes 10 s natively takes minutes here.
SLOW_S = 900.0

INSTALLER_DOCKERFILE = """\
ARG BASE_IMAGE
FROM ${BASE_IMAGE}
RUN useradd --create-home --uid 1000 --shell /bin/bash owner
LABEL io.step-station.aarch64-test="1"
"""


def _base() -> str:
    return os.environ["STEP_STATION_ARM64_BASE"]


def _pip_cache() -> Path:
    default = Path.home() / ".cache" / "step-station" / "arm64-root" / "pip-cache"
    path = Path(os.environ.get("STEP_STATION_ARM64_PIP_CACHE") or default)
    path.mkdir(parents=True, exist_ok=True)
    os.chown(path, OWNER_UID, OWNER_UID)  # the owner's pip writes it; the host runs as root
    return path


def _pip_environment() -> dict[str, str]:
    """The host's CA bundle (PyPI is reached through a proxy only the host trusts)."""
    env = {
        "SSL_CERT_FILE": str(HOST_CA),
        "PIP_CERT": str(HOST_CA),
        "REQUESTS_CA_BUNDLE": str(HOST_CA),
        "PIP_CACHE_DIR": "/pip-cache",
        "PIP_DEFAULT_TIMEOUT": "180",
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
    }
    for key in ("HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "no_proxy"):
        if os.environ.get(key):
            env[key] = os.environ[key]
    return env


def _wait(what: str, probe: object, deadline_s: float, why: object = None) -> object:
    """Calls `probe` until it returns something truthy; fails naming `what` at the deadline."""
    assert callable(probe)
    deadline = time.monotonic() + deadline_s
    last: object = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(1)
    detail = why() if callable(why) else ""
    pytest.fail(f"{what} within {deadline_s:.0f} s (last: {last!r})\n{detail}", pytrace=False)


@pytest.fixture(scope="module")
def arm64_base(docker_client: docker.DockerClient) -> str:
    image = docker_client.images.get(_base())
    assert image.attrs["Architecture"] == "arm64", image.attrs["Architecture"]
    return _base()


@pytest.fixture(scope="module")
def installer_image(docker_client: docker.DockerClient, arm64_base: str) -> str:
    """The arm64 root plus an ordinary user; built once per base, then cached."""
    base_id = docker_client.images.get(arm64_base).id
    tag = f"step-station/aarch64-installer-test:{base_id.split(':')[-1][:12]}"
    try:
        docker_client.images.get(tag)
    except docker.errors.ImageNotFound:
        context = Path(f"/tmp/step-aarch64-ctx-{uuid.uuid4().hex[:8]}")
        context.mkdir()
        try:
            (context / "Dockerfile").write_text(INSTALLER_DOCKERFILE)
            docker_client.images.build(
                path=str(context),
                tag=tag,
                buildargs={"BASE_IMAGE": arm64_base},
                platform="linux/arm64",
                rm=True,
            )
        finally:
            shutil.rmtree(context)
    return tag


class Box:
    """A running arm64 container; `sh` runs bash in it as the owner."""

    def __init__(self, container: docker.models.containers.Container) -> None:
        self.container = container
        self.env = {**_pip_environment(), "HOME": HOME, "USER": "owner"}

    def sh(self, script: str, *, check: bool = True) -> tuple[int, str]:
        code, out = self.container.exec_run(
            ["bash", "-c", script], user="owner", environment=self.env, workdir=HOME
        )
        text = out.decode(errors="replace")
        if check:
            assert code == 0, f"`{script}` exited {code}:\n{text[-6000:]}"
        return code, text


@pytest.fixture
def box(
    docker_client: docker.DockerClient, installer_image: str, docker_labels: dict[str, str]
) -> Iterator[Box]:
    container = docker_client.containers.run(
        installer_image,
        ["sleep", "infinity"],
        detach=True,
        init=True,
        labels=docker_labels,
        name=f"step-aarch64-{uuid.uuid4().hex[:10]}",
        # The host's network: the openai SDK here reaches the gateway in there on loopback.
        network_mode="host",
        volumes={
            str(REPO): {"bind": "/checkout", "mode": "ro"},
            str(HOST_CA): {"bind": str(HOST_CA), "mode": "ro"},
            str(_pip_cache()): {"bind": "/pip-cache", "mode": "rw"},
        },
    )
    box = Box(container)
    # The checkout as the owner would have it (a clone): sources and installer only.
    box.sh(
        f"mkdir -p {SRC} && cd /checkout && tar -c --exclude=__pycache__ pyproject.toml "
        f"README.md appliance ui installer | tar -x -C {SRC}"
    )
    yield box
    container.remove(force=True)


@pytest.mark.timeout(2400)
def test_install_up_demo_and_chat_on_arm64(box: Box) -> None:
    assert box.sh("uname -m")[1].strip() == "aarch64"
    ui, api, engine = free_port(), free_port(), free_port()
    started = time.monotonic()
    _, out = box.sh(
        f"{SRC}/installer/install.sh --demo --no-linger --ui-port {ui} --api-port {api}"
    )
    install_s = time.monotonic() - started
    checks = out.split("== install")[0]
    assert "[FAIL]" not in checks, out  # (doctor's FAILs after it: no GPU, no Docker, expected)
    assert "aarch64" in checks, out  # the linux check names the machine
    assert "Step Station is installed" in out, out
    assert "built from source" not in out, out  # every dependency had an aarch64 wheel
    # The gateway asks for a key even on loopback: the chat below must carry one.
    box.sh(
        f"{BIN} config set engine.port {engine} && "
        f"{BIN} config set gateway.require_key_on_loopback true"
    )
    key = json.loads(box.sh(f"{BIN} keys create arm64-test --json")[1])["key"]

    _, pid = box.sh(f"setsid {BIN} up --demo --no-browser >/tmp/up.log 2>&1 </dev/null & echo $!")
    up_started = time.monotonic()

    def health() -> dict[str, object] | None:
        with contextlib.suppress(httpx.HTTPError, ValueError):
            resp = httpx.get(f"http://127.0.0.1:{ui}/healthz", timeout=5)
            if resp.status_code == 200 and resp.json().get("engine") == "ready":
                return dict(resp.json())
        return None

    def up_log() -> str:
        return "-- /tmp/up.log:\n" + box.sh("tail -c 6000 /tmp/up.log", check=False)[1]

    try:
        state = _wait("`up --demo` answered /healthz with the engine ready", health, SLOW_S, up_log)
        up_s = time.monotonic() - up_started
        assert state == {"ok": True, "demo": True, "engine": "ready"}
        log = box.sh("cat /tmp/up.log")[1]
        assert "Traceback" not in log, log  # the Sharing tab was built (net_if_stats fails here)
        assert f"Step Station is up at http://127.0.0.1:{ui}/" in log, log

        base_url = f"http://127.0.0.1:{api}/v1"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=base_url, api_key="sk-wrong", max_retries=0).models.list()
        client = openai.OpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=300)
        model = client.models.list().data[0].id
        reply = client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": "Say hello from aarch64."}],
            max_tokens=400,  # the reasoning comes first; room for the answer after it
            extra_body={"reasoning_effort": "low"},
        )
        text = reply.choices[0].message.content or ""
        assert text.strip(), reply
        print(
            f"\naarch64 (emulated): install.sh --demo {install_s:.0f} s, "
            f"up --demo to /healthz ready {up_s:.0f} s; reply {text[:60]!r}"
        )
    finally:
        box.sh(
            f"kill {pid.strip()}; for i in $(seq 300); do kill -0 {pid.strip()} || exit 0; "
            "sleep 0.1; done; exit 1",
            check=False,
        )


@pytest.mark.timeout(1800)
def test_installer_names_the_missing_aarch64_wheel(box: Box) -> None:
    """psutil forced to build from source (PIP_NO_BINARY), as if PyPI had no aarch64 wheel of
    it, in a root with no C compiler: the installer says which package, for which platform, why,
    and what to install."""
    code, out = box.sh(
        f"PIP_NO_BINARY=psutil {SRC}/installer/install.sh --demo --no-linger --no-service",
        check=False,
    )
    assert code != 0, out
    assert "no wheel of psutil for linux-aarch64, Python 3.11 on the package index" in out, out
    assert "needs a C compiler" in out, out
    assert "sudo apt-get install build-essential python3-dev" in out, out
    assert "pip install failed; the full log is" in out, out


def _appliance_context(into: Path) -> None:
    """docker/Dockerfile's build context: the sources it copies, plus the host's CA bundle as
    docker/extra-ca.crt (the build's pip reaches PyPI through a proxy only the host trusts)."""
    with tarfile.open(into / "src.tar", "w") as tar:
        for part in ("pyproject.toml", "README.md", "appliance", "ui", "docker/Dockerfile"):
            tar.add(
                REPO / part,
                arcname=part,
                filter=lambda info: None if "__pycache__" in info.name else info,
            )
    with tarfile.open(into / "src.tar") as tar:
        tar.extractall(into, filter="data")
    (into / "src.tar").unlink()
    shutil.copy(HOST_CA, into / "docker" / "extra-ca.crt")


@pytest.mark.timeout(3000)
def test_dockerfile_builds_for_arm64_and_starts_up_demo(
    docker_client: docker.DockerClient, arm64_base: str, docker_labels: dict[str, str]
) -> None:
    context = Path(f"/tmp/step-aarch64-ctx-{uuid.uuid4().hex[:8]}")
    context.mkdir()
    tag = "step-station/appliance-aarch64-test:latest"
    started = time.monotonic()
    try:
        _appliance_context(context)
        image, _ = docker_client.images.build(
            path=str(context),
            dockerfile="docker/Dockerfile",
            tag=tag,
            buildargs={"BASE_IMAGE": arm64_base},
            platform="linux/arm64",
            rm=True,
            forcerm=True,
        )
    finally:
        shutil.rmtree(context)
    build_s = time.monotonic() - started
    assert image.attrs["Architecture"] == "arm64"
    assert image.attrs["Config"]["Entrypoint"] == ["step-station"]
    assert not any("extra-ca" in (layer.get("CreatedBy") or "") for layer in image.history())

    container = docker_client.containers.run(
        tag, ["up", "--demo", "--no-browser"], detach=True, labels=docker_labels
    )
    probe = (
        "import urllib.request as u; "
        "print(u.urlopen('http://127.0.0.1:7860/healthz', timeout=4).read().decode())"
    )

    def health() -> dict[str, object] | None:
        container.reload()
        assert container.status in ("created", "running"), container.logs()[-4000:].decode()
        code, out = container.exec_run(["python3", "-c", probe])
        if code == 0:
            state = json.loads(out)
            if state.get("engine") == "ready":
                return dict(state)
        return None

    try:
        assert container.exec_run(["uname", "-m"])[1].decode().strip() == "aarch64"
        up_started = time.monotonic()
        state = _wait(
            "the arm64 image's `up --demo` answered /healthz",
            health,
            SLOW_S,
            lambda: container.logs()[-6000:].decode(errors="replace"),
        )
        assert state == {"ok": True, "demo": True, "engine": "ready"}
        print(
            f"\ndocker/Dockerfile for linux/arm64: build {build_s:.0f} s, "
            f"up --demo to /healthz ready {time.monotonic() - up_started:.0f} s"
        )
    finally:
        container.remove(force=True)


def test_arm64_only_image_is_refused_on_this_amd64_host(
    docker_client: docker.DockerClient, arm64_base: str
) -> None:
    """The arm64 root as an engine image in the local registry: nothing injected, this amd64
    host's Docker is asked and the pull is refused before it starts; a Station would take it."""
    repo = "localhost:5000/step-station-test/arm64-only"
    tag = docker_client.images.get(arm64_base).id.split(":")[-1][:12]
    ref = f"{repo}:{tag}"
    docker_client.images.get(arm64_base).tag(repo, tag=tag)
    try:
        for event in docker_client.images.push(repo, tag=tag, stream=True, decode=True):
            assert "error" not in event, event
    finally:
        docker_client.images.remove(ref)
    host = DockerRuntime()
    assert host.host_platform() == "linux/amd64"
    with pytest.raises(ImagePullError) as caught:
        host.check_platform(ref)
    assert f"The image {ref} has no linux/amd64 variant (it offers: linux/arm64)" in str(
        caught.value
    )
    DockerRuntime(platform="linux/arm64").check_platform(ref)  # a Station: no objection
    assert not host.has_image(ref)
