"""The engine manager against the real Docker engine, with the simulator image from the local
registry as `vllm/vllm-openai:stepfun37`. Each test owns a uniquely named container and port."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import openai
import pytest
from engine_hub import FakeHub, Repo
from engine_net import Proxy, free_port

from appliance import endpoint
from appliance import settings as st
from appliance.engine import EngineState, Supervisor, phases
from appliance.engine.docker_runtime import DockerRuntime
from appliance.engine.health import port_is_free
from appliance.engine.launch import launch_spec_for
from appliance.engine.spec import LABEL_NAME
from appliance.errors import DockerUnavailableError, EngineError

pytestmark = [pytest.mark.docker, pytest.mark.timeout(300)]

GPU_UUID = "GPU-6f1c0e9b-1111-2222-3333-444455556666"


@pytest.fixture
def dk(docker_client, sim_image_ref):
    """The shared harness (tests/fixtures/docker.py): engine up, simulator image present."""
    del sim_image_ref
    return docker_client


def _ours(dk, name: str) -> list:
    return dk.containers.list(all=True, filters={"label": f"{LABEL_NAME}={name}"})


@pytest.fixture
def settings(dk, sim_image_ref: str, monkeypatch: pytest.MonkeyPatch):
    s = st.with_changes(
        st.Settings(),
        {
            "engine.container_name": f"sst-{uuid.uuid4().hex[:10]}",
            "engine.port": free_port(),
            "engine.image": sim_image_ref,
            "engine.profile": "fp8-tp1",
            "engine.request_gpu": False,  # this engine has no NVIDIA runtime
            "engine.start_timeout_s": 90,
            "engine.stop_timeout_s": 10,
        },
    )
    monkeypatch.setenv("STEP_SIM_LOAD_S", "1.5")
    yield s
    for container in _ours(dk, s.engine.container_name):
        container.remove(force=True)


@pytest.fixture
def make_sup(settings):
    made: list[Supervisor] = []

    def make(changed: st.Settings | None = None, **kwargs) -> Supervisor:
        """A supervisor on the fixture's settings, or on `changed` (a test's own copy)."""
        kwargs.setdefault("download_weights", False)
        sup = Supervisor(changed or settings, poll_interval_s=0.1, outside_poll_s=0, **kwargs)
        made.append(sup)
        return sup

    yield make
    for sup in made:
        sup.close()


def test_start_phases_ready_chat_stop(dk, settings, make_sup) -> None:
    sup = make_sup()
    sup.start()
    status = sup.wait_ready(120)
    assert [p.name for p in status.phases] == list(phases.LOG_PHASES)
    assert all(p.done for p in status.phases)
    assert status.effective["kv_cache_tokens"] > 0
    (container,) = _ours(dk, settings.engine.container_name)
    assert container.id == status.container_id
    assert container.status == "running"
    # host PIDs of the engine (what NVML reports), for the dashboard's per-process memory
    pids = sup.runtime.engine_pids(container.id)
    assert container.attrs["State"]["Pid"] in pids
    # the engine is on its private socket, no port on the host: Docker's bridge with nothing
    # published, as this engine may fetch its weights itself (download_weights=False)
    path = endpoint.socket_path(settings.engine.container_name)
    assert sup.engine_url == endpoint.socket_url(path)
    assert container.attrs["HostConfig"]["NetworkMode"] == "bridge"
    assert not container.attrs["HostConfig"].get("PortBindings")
    assert endpoint.socket_answers(path)
    assert port_is_free("127.0.0.1", settings.engine.port)

    # vLLM requires the engine's per-start key on /v1 (only the appliance holds it)
    client = openai.OpenAI(**endpoint.openai_kwargs(sup.engine_url), api_key=sup.engine_api_key)
    reply = client.chat.completions.create(
        model=sup.served_model_name,
        messages=[{"role": "user", "content": "Say hi"}],
        max_tokens=400,
        extra_body={"reasoning_effort": "low"},
    )
    assert reply.choices[0].message.content

    assert sup.stop().state == EngineState.STOPPED
    assert _ours(dk, settings.engine.container_name) == []
    assert not endpoint.socket_answers(path)
    assert not path.exists()


def test_tcp_listen_serves_on_loopback_in_the_hosts_network(dk, settings, make_sup) -> None:
    """engine.listen = "tcp": vLLM on 127.0.0.1:engine.port in the host's network, no socket."""
    settings = st.with_changes(settings, {"engine.listen": "tcp"})
    sup = make_sup(settings)
    sup.start()
    status = sup.wait_ready(120)
    (container,) = _ours(dk, settings.engine.container_name)
    assert container.attrs["HostConfig"]["NetworkMode"] == "host"
    assert sup.engine_url == f"http://127.0.0.1:{settings.engine.port}"
    assert not port_is_free("127.0.0.1", settings.engine.port)
    assert not endpoint.socket_path(settings.engine.container_name).exists()
    client = openai.OpenAI(base_url=f"{sup.engine_url}/v1", api_key=sup.engine_api_key)
    assert client.models.list().data[0].id == status.served_model_name
    assert sup.stop().state == EngineState.STOPPED
    assert port_is_free("127.0.0.1", settings.engine.port)


def test_created_container_spec(dk, settings, station_home: Path) -> None:
    settings = st.with_changes(settings, {"engine.request_gpu": True, "engine.gpu_uuid": GPU_UUID})
    spec = launch_spec_for(settings, secrets=st.Secrets(hf_token="hf_test_token"))
    spec = spec.with_env(HF_HUB_OFFLINE="1")
    runtime = DockerRuntime()
    handle = runtime.create(spec)
    attrs = dk.api.inspect_container(handle.id)
    host, config = attrs["HostConfig"], attrs["Config"]
    (request,) = host["DeviceRequests"]
    assert request["DeviceIDs"] == [GPU_UUID]
    assert request["Capabilities"] == [["gpu"]]
    assert host["IpcMode"] == "host"
    limits = {u["Name"]: (u["Soft"], u["Hard"]) for u in host["Ulimits"]}
    assert limits == {"memlock": (-1, -1), "stack": (67108864, 67108864)}
    # vLLM on its private socket: no network at all (the appliance downloaded the weights),
    # nothing published (tests/security)
    assert host["NetworkMode"] == "none"
    assert not host.get("PortBindings")
    assert spec.arg_value("--uds") == endpoint.CONTAINER_SOCKET
    assert spec.arg_value("--host") is None
    mounts = {m["Target"]: m for m in host["Mounts"]}
    socket_dir = endpoint.socket_dir(settings.engine.container_name)
    assert mounts[endpoint.CONTAINER_SOCKET_DIR]["Source"] == str(socket_dir)
    assert not mounts[endpoint.CONTAINER_SOCKET_DIR].get("ReadOnly")  # vLLM binds its socket there
    cache = station_home / "cache"
    assert mounts["/root/.cache/huggingface"]["Source"] == str(cache / "huggingface")
    assert mounts["/root/.cache/vllm"]["Source"] == str(cache / "compile" / "vllm")
    assert mounts["/root/.cache/flashinfer"]["Source"] == str(cache / "compile" / "flashinfer")
    assert mounts["/root/.triton"]["Source"] == str(cache / "compile" / "triton")
    assert all(m["Type"] == "bind" for m in mounts.values())
    env = dict(e.split("=", 1) for e in config["Env"])
    assert "HF_TOKEN" not in env  # the appliance downloads; the offline engine never has it
    assert env["HF_HUB_OFFLINE"] == "1"
    assert env["STEP_SIM_LOAD_S"] == "1.5"
    assert config["Cmd"] == list(spec.args)
    assert config["Cmd"][0] == "stepfun-ai/Step-3.7-Flash-FP8"
    assert config["Image"] == settings.engine.image
    labels = config["Labels"]
    assert labels["io.step-station.managed"] == "true"
    assert labels["io.step-station.name"] == settings.engine.container_name
    assert labels["io.step-station.profile"] == "fp8-tp1"
    assert labels["io.step-station.settings-hash"] == spec.settings_hash
    runtime.remove(handle)
    # starting it needs the NVIDIA runtime, which this engine lacks: a clear error, no leftovers
    with pytest.raises(EngineError, match="nvidia-ctk runtime configure"):
        runtime.launch(spec)
    assert _ours(dk, settings.engine.container_name) == []


HOLDER = textwrap.dedent(
    """
    import json, sys, time
    from appliance import settings as st
    from appliance.engine import Supervisor
    s = st.Settings()
    s = st.with_changes(s, {
        "engine.port": int(sys.argv[1]), "engine.container_name": sys.argv[2],
        "engine.image": sys.argv[3], "engine.profile": "fp8-tp1", "engine.request_gpu": False,
    })
    sup = Supervisor(s, download_weights=False, outside_poll_s=0)
    began = time.monotonic()
    status = sup.attach()
    attached = {"state": status.state.value, "id": status.container_id,
                "attach_s": time.monotonic() - began}
    if sys.argv[4] == "start":
        sup.start()
        status = sup.wait_ready(120)
        attached["id"] = status.container_id
    print(json.dumps(attached), flush=True)
    time.sleep(600)
    """
)


def _holder(settings, mode: str) -> tuple[dict, subprocess.Popen]:
    import json

    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            HOLDER,
            str(settings.engine.port),
            settings.engine.container_name,
            settings.engine.image,
            mode,
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    line = proc.stdout.readline()
    assert line, f"holder exited with {proc.wait()}"
    return json.loads(line), proc


def test_kill_9_of_the_appliance_then_adopt_10_of_10(dk, settings) -> None:
    first, proc = _holder(settings, "start")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    engine_id = first["id"]
    assert engine_id
    for _ in range(10):
        seen, proc = _holder(settings, "attach")
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert seen["state"] == "ready"  # attach() itself returned ready: no start, no wait
        assert seen["id"] == engine_id
        assert [c.id for c in _ours(dk, settings.engine.container_name)] == [engine_id]


def test_start_while_running_never_makes_a_second_container(dk, settings, make_sup) -> None:
    first = make_sup()
    first.start()
    engine_id = first.wait_ready(120).container_id
    second = make_sup()  # another process's supervisor, not attached yet
    second.start()
    assert second.wait_ready(30).container_id == engine_id
    assert len(_ours(dk, settings.engine.container_name)) == 1
    assert "adopted" in second.status().message


def test_engine_crash_is_reported(dk, settings, make_sup, monkeypatch) -> None:
    monkeypatch.setenv("STEP_SIM_FAULT", "crash")
    monkeypatch.setenv("STEP_SIM_FAULT_AFTER_S", "1")
    sup = make_sup()
    sup.start()
    sup.wait_ready(120)
    status = sup.status()
    while status.state == EngineState.READY:
        status = sup.wait_for_change(status.version, 30)
    assert status.state == EngineState.FAILED
    assert status.exit_code == 1
    assert "exited unexpectedly (exit code 1)" in status.message
    assert any("illegal memory access" in line for line in status.log_tail)


def test_oom_at_start_retries_then_fails_clearly(dk, settings, make_sup, monkeypatch) -> None:
    monkeypatch.setenv("STEP_SIM_FAULT", "oom")
    sup = make_sup()
    sup.start()
    with pytest.raises(EngineError, match="ran out of GPU memory while starting") as info:
        sup.wait_ready(120)
    assert "after a retry with --gpu-memory-utilization 0.90 (was 0.95)" in str(info.value)
    assert "pick a smaller profile" in str(info.value)
    status = sup.status()
    assert status.oom
    assert status.exit_code == 1
    (container,) = _ours(dk, settings.engine.container_name)  # the second attempt, kept for logs
    assert "0.90" in container.attrs["Config"]["Cmd"]


def test_hang_during_load_hits_the_deadline(dk, settings, make_sup, monkeypatch) -> None:
    monkeypatch.setenv("STEP_SIM_FAULT", "hang")
    settings = st.with_changes(settings, {"engine.start_timeout_s": 4})
    sup = make_sup(settings)
    sup.start()
    with pytest.raises(EngineError, match="not ready after 4 s"):
        sup.wait_ready(120)
    for container in _ours(dk, settings.engine.container_name):
        assert container.status != "running"


def test_port_already_taken(dk, settings, make_sup) -> None:
    settings = st.with_changes(settings, {"engine.listen": "tcp"})
    with socket.socket() as other:
        other.bind(("127.0.0.1", settings.engine.port))
        other.listen()
        sup = make_sup(settings)
        sup.start()
        with pytest.raises(EngineError, match=f"Port {settings.engine.port} on 127.0.0.1"):
            sup.wait_ready(30)
    assert _ours(dk, settings.engine.container_name) == []


def test_socket_already_answering(dk, settings, make_sup) -> None:
    path = endpoint.prepare_socket(settings.engine.container_name)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as other:
        other.bind(str(path))
        other.listen()
        sup = make_sup()
        sup.start()
        with pytest.raises(EngineError, match="Another engine already listens on"):
            sup.wait_ready(30)
        assert str(path) in sup.status().message
        assert endpoint.socket_answers(path)  # left alone
    assert _ours(dk, settings.engine.container_name) == []


def test_docker_unreachable(settings, make_sup, monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path / 'no-docker.sock'}")
    sup = make_sup()
    with pytest.raises(DockerUnavailableError, match="Docker is not reachable"):
        sup.attach()
    sup.start()
    with pytest.raises(EngineError, match="systemctl start docker"):
        sup.wait_ready(30)
    assert sup.status().state == EngineState.FAILED
    cli = subprocess.run(
        [sys.executable, "-m", "appliance", "status"],
        capture_output=True,
        text=True,
        env=os.environ | {"DOCKER_HOST": f"unix://{tmp_path / 'no-docker.sock'}"},
    )
    assert cli.returncode == DockerUnavailableError.exit_code
    assert "Docker is not reachable" in cli.stderr


def test_docker_lost_and_back_while_serving(dk, settings, tmp_path: Path) -> None:
    """The daemon is shared, so "stopped and restarted" is a socket proxy that goes away."""
    proxy = Proxy("/var/run/docker.sock", listen=str(tmp_path / "docker.sock")).start()
    runtime = DockerRuntime(base_url=f"unix://{tmp_path / 'docker.sock'}", timeout_s=5)
    sup = Supervisor(
        settings, runtime=runtime, download_weights=False, poll_interval_s=0.1, outside_poll_s=0
    )
    try:
        sup.start()
        engine_id = sup.wait_ready(120).container_id
        proxy.cut()
        status = sup.status()
        while "Docker is not reachable" not in status.message:
            status = sup.wait_for_change(status.version, 30)
        assert status.state == EngineState.READY  # unknown is not "failed"
        assert "unknown until Docker is back" in status.message
        proxy.resume()
        while "reachable again" not in status.message:
            status = sup.wait_for_change(status.version, 30)
        assert status.state == EngineState.READY
        assert status.container_id == engine_id
        assert endpoint.request("GET", f"{sup.engine_url}/metrics", 10.0).status_code == 200
        # the log stream is followed again: the access line of that request arrives
        while not any('"GET /metrics' in line for line in sup.status().log_tail):
            sup.wait_for_change(sup.version, 30)
        assert sup.stop().state == EngineState.STOPPED
        assert _ours(dk, settings.engine.container_name) == []
    finally:
        sup.close()
        proxy.close()


def test_disk_too_small_for_the_weights(dk, settings, make_sup, monkeypatch) -> None:
    hub = FakeHub().start()
    try:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        hub.repos["stepfun-ai/Step-3.7-Flash-FP8"] = Repo(
            files={"config.json": b"{}"}, claimed_sizes={"config.json": 213 * 10**15}
        )
        sup = make_sup(download_weights=True)
        sup.start()
        with pytest.raises(EngineError, match="Not enough disk space") as info:
            sup.wait_ready(60)
        assert "engine.hf_cache_dir" in str(info.value)
        assert sup.status().phase == "Failed"
        assert _ours(dk, settings.engine.container_name) == []  # nothing was started
    finally:
        hub.close()
