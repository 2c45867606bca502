"""Doctor: runs anywhere (no Docker, no GPU), says pass / warn / fail with one fix each, and exits
non-zero when a start would fail."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from appliance import doctor, endpoint, hardware
from appliance.cli import main
from appliance.doctor import FAIL, PASS, WARN, DockerFacts
from appliance.hardware import GB
from appliance.settings import Settings, with_changes

NAMES = [
    "settings",
    "docker",
    "docker-version",
    "nvidia-runtime",
    "gpu",
    "profile",
    "disk",
    "engine-socket",
    "port-ui",
    "port-gateway",
    "hf-token",
]


@pytest.fixture
def dead_docker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """DOCKER_HOST pointing at a socket nobody listens on."""
    path = tmp_path / "dead.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.close()  # the file stays, nothing listens: connection refused
    monkeypatch.setenv("DOCKER_HOST", f"unix://{path}")
    return f"unix://{path}"


@pytest.fixture
def free_ports() -> None:
    """Point the three ports at ones free now, so the test does not depend on this machine."""
    ports = []
    for _ in range(3):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
    for key, port in zip(("engine.port", "ui.port", "gateway.port"), ports, strict=True):
        assert main(["config", "set", key, str(port)]) == 0


def _doctor_json(capsys: pytest.CaptureFixture[str]) -> tuple[int, dict]:
    capsys.readouterr()
    code = main(["doctor", "--json"])
    return code, json.loads(capsys.readouterr().out)


def _by_name(report: dict) -> dict[str, dict]:
    return {c["name"]: c for c in report["checks"]}


# ------------------------------------------------------------------------- the real machine


@pytest.mark.usefixtures("free_ports")
def test_doctor_without_docker_or_gpu(dead_docker: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, report = _doctor_json(capsys)
    checks = _by_name(report)
    assert list(checks) == NAMES
    for check in report["checks"]:
        assert check["status"] in {PASS, WARN, FAIL}
        assert check["detail"]
        if check["status"] != PASS:
            assert check["fix"]
    assert checks["docker"]["status"] == FAIL
    assert dead_docker in checks["docker"]["detail"]
    assert checks["docker"]["fix"] == "sudo systemctl start docker"
    if not hardware.detect().gpus:
        assert checks["gpu"]["status"] == FAIL
        assert "no NVIDIA GPU" in checks["gpu"]["detail"]
        assert checks["profile"]["status"] == FAIL
    for port in ("engine-socket", "port-ui", "port-gateway"):
        assert checks[port]["status"] == PASS
    assert code == 1
    assert report["ok"] is False


@pytest.mark.usefixtures("free_ports", "dead_docker")
def test_doctor_human_output_names_each_fix(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["doctor"]) == 1
    out = capsys.readouterr().out
    assert "[FAIL] docker" in out
    assert "fix: sudo systemctl start docker" in out
    assert "Not ready:" in out


@pytest.mark.usefixtures("dead_docker")
def test_port_in_use_is_a_fail_naming_the_port(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "set", "engine.listen", "tcp"]) == 0  # the engine on a TCP port
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        assert main(["config", "set", "engine.port", str(port)]) == 0
        _, report = _doctor_json(capsys)
    engine = _by_name(report)["port-engine"]
    assert engine["status"] == FAIL
    assert f"127.0.0.1:{port}" in engine["detail"]
    assert engine["fix"] == f"step-station config set engine.port {port + 10}"


@pytest.mark.usefixtures("dead_docker")
def test_on_its_socket_the_engine_needs_no_port(capsys: pytest.CaptureFixture[str]) -> None:
    """By default the engine takes no TCP port: a program on engine.port is no concern, and the
    doctor names the private socket instead."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        assert main(["config", "set", "engine.port", str(holder.getsockname()[1])]) == 0
        _, report = _doctor_json(capsys)
    checks = _by_name(report)
    assert "port-engine" not in checks
    assert checks["engine-socket"]["status"] == PASS
    assert str(endpoint.socket_path("step-station-engine")) in checks["engine-socket"]["detail"]


def test_two_settings_on_one_port_fail() -> None:
    settings = with_changes(Settings(), {"engine.listen": "tcp"})
    settings = with_changes(settings, {"ui.port": settings.engine.port})
    checks = {c.name: c for c in doctor.check_ports(settings)}
    assert checks["port-ui"].status == FAIL
    assert "engine.port" in checks["port-ui"].detail


@pytest.mark.usefixtures("dead_docker", "free_ports")
def test_token_is_reported_never_printed(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = "hf_doctorSecretValue123"
    monkeypatch.setenv("HF_TOKEN", secret)
    assert main(["doctor"]) == 1
    human = capsys.readouterr().out
    _, report = _doctor_json(capsys)
    assert secret not in human
    assert secret not in json.dumps(report)
    assert _by_name(report)["hf-token"]["status"] == PASS
    assert "not shown" in _by_name(report)["hf-token"]["detail"]


@pytest.mark.usefixtures("dead_docker", "free_ports")
def test_corrupt_settings_is_a_warning(
    capsys: pytest.CaptureFixture[str], station_home: Path
) -> None:
    path = station_home / "config" / "settings.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("[engine\nbroken")
    _, report = _doctor_json(capsys)
    settings = _by_name(report)["settings"]
    assert settings["status"] == WARN
    assert str(path) in settings["detail"]


# ----------------------------------------------------------------- seams that cannot run here


def _station_docker() -> DockerFacts:
    return DockerFacts(version="28.3.3", api_version="1.51", runtimes=("nvidia", "runc"))


def _run(settings: Settings, **kwargs: object) -> doctor.Report:
    defaults: dict[str, object] = {
        "hw": hardware.PRESETS["gb300"],
        "docker": _station_docker,
        "cdi_dirs": (),
        "disk_free": lambda _path: 4000 * GB,
    }
    defaults.update(kwargs)
    return doctor.run_doctor(settings, **defaults)  # type: ignore[arg-type]


def _free_port_settings() -> Settings:
    settings = Settings()
    ports = []
    socks = [socket.socket() for _ in range(3)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return with_changes(
        settings, {"engine.port": ports[0], "ui.port": ports[1], "gateway.port": ports[2]}
    )


def test_a_ready_station_passes_everything() -> None:
    report = _run(_free_port_settings())
    assert [c.name for c in report.checks] == NAMES
    assert {c.name: c.status for c in report.checks} == dict.fromkeys(NAMES, PASS)
    assert report.ok
    assert "fp8-tp1 fits" in report.check("profile").detail
    assert "GPU-preset-gb300-0" in report.check("gpu").detail


def test_no_nvidia_runtime_fails_with_the_nvidia_ctk_fix(tmp_path: Path) -> None:
    def plain_docker() -> DockerFacts:
        return DockerFacts(version="20.10.24", api_version="1.41", runtimes=("runc",))

    report = _run(_free_port_settings(), docker=plain_docker, cdi_dirs=(str(tmp_path),))
    check = report.check("nvidia-runtime")
    if check.status == PASS:  # this machine has the toolkit hook installed
        assert "nvidia-container-runtime-hook" in check.detail
        return
    assert check.status == FAIL
    assert check.fix.startswith("sudo nvidia-ctk runtime configure --runtime=docker")
    assert not report.ok


def test_cdi_spec_counts_as_nvidia_runtime(tmp_path: Path) -> None:
    (tmp_path / "nvidia.yaml").write_text("cdiVersion: 0.5.0\nkind: nvidia.com/gpu\n")
    (tmp_path / "other.yaml").write_text("kind: vendor.example/thing\n")

    def plain_docker() -> DockerFacts:
        return DockerFacts(version="25.0", api_version="1.44", runtimes=("runc",))

    check = _run(_free_port_settings(), docker=plain_docker, cdi_dirs=(str(tmp_path),)).check(
        "nvidia-runtime"
    )
    assert check.status == PASS
    assert str(tmp_path / "nvidia.yaml") in check.detail
    assert "other.yaml" not in check.detail


def test_disk_needs_weights_and_image() -> None:
    # fp8-tp1: 212.5 GB (197.9 GiB) of weights + ~20 GiB image = 233.97 GB.
    tight = _run(_free_port_settings(), disk_free=lambda _p: 200 * GB).check("disk")
    assert tight.status == FAIL
    assert tight.detail.startswith("186.3 GiB free at ")
    assert "fp8-tp1 needs 197.9 GiB more of weights + ~20 GiB for the image" in tight.detail
    assert tight.fix.startswith("step-station config set engine.hf_cache_dir")
    close = _run(_free_port_settings(), disk_free=lambda _p: 235 * GB).check("disk")
    assert close.status == WARN  # 1.03 GB to spare
    assert close.detail.endswith("(less than 10 GiB to spare)")
    assert _run(_free_port_settings(), disk_free=lambda _p: 300 * GB).check("disk").status == PASS


def test_disk_counts_weights_already_in_the_cache(tmp_path: Path) -> None:
    settings = with_changes(_free_port_settings(), {"engine.hf_cache_dir": str(tmp_path / "hf")})
    blobs = tmp_path / "hf" / "hub" / "models--stepfun-ai--Step-3.7-Flash-FP8" / "blobs"
    blobs.mkdir(parents=True)
    with (blobs / "sha256-part").open("wb") as f:
        f.truncate(200 * GB)  # sparse: 200 GB already downloaded, no disk used
    check = _run(settings, disk_free=lambda _p: 40 * GB).check("disk")
    # 212.5 - 200 = 12.5 GB (11.6 GiB) of weights + 20 GiB image = 33.97 GB needed, 40 GB free.
    assert "11.6 GiB more" in check.detail
    assert "186.3 GiB already cached" in check.detail
    assert check.status == WARN  # 6.03 GB to spare


def test_h200_says_no_profile_fits_and_why() -> None:
    report = _run(_free_port_settings(), hw=hardware.PRESETS["h200"])
    profile = report.check("profile")
    assert profile.status == FAIL
    assert "212.5 GB" in profile.detail
    assert "Blackwell" in profile.detail
    assert profile.fix == "step-station plan"
    assert report.check("gpu").status == PASS


def test_process_runtime_does_not_ask_docker() -> None:
    settings = with_changes(_free_port_settings(), {"engine.runtime": "process"})

    def must_not_be_called() -> DockerFacts:
        raise AssertionError("the doctor asked Docker although the runtime is a process")

    report = _run(settings, docker=must_not_be_called)
    assert report.check("docker").status == PASS
    assert "not needed" in report.check("docker").detail
    assert report.check("nvidia-runtime").status == PASS


def test_without_gpu_request_missing_gpu_is_a_warning() -> None:
    settings = with_changes(_free_port_settings(), {"engine.request_gpu": False})
    no_gpu = hardware.Hardware(gpus=[], host=hardware.PRESETS["h200"].host, nvml_error="none")
    report = _run(settings, hw=no_gpu)
    assert report.check("gpu").status == WARN
    assert report.check("profile").status == WARN
    assert report.ok
