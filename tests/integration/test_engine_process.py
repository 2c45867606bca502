"""The supervisor over the process runtime, driving the real simulator (`python -m
appliance.simulator`): the same state machine that drives Docker, without Docker."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import httpx
import openai
import psutil
import pytest
from fixtures.sim import free_port

from appliance import endpoint
from appliance import settings as st
from appliance.engine import EngineState, Supervisor, phases
from appliance.engine.health import port_is_free
from appliance.errors import EngineError

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def settings() -> st.Settings:
    port = free_port()
    return st.with_changes(
        st.Settings(),
        {
            "engine.port": port,
            "engine.profile": "fp8-tp1",
            "engine.container_name": f"sim-{os.getpid()}-{port}",
            "engine.start_timeout_s": 60,
            "engine.stop_timeout_s": 10,
        },
    )


@pytest.fixture
def sim_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    monkeypatch.setenv("STEP_SIM_LOAD_S", "1.5")
    return monkeypatch


@pytest.fixture
def make_supervisor(settings: st.Settings):
    made: list[Supervisor] = []

    def make(changed: st.Settings | None = None, **kwargs) -> Supervisor:
        """A supervisor on the fixture's settings, or on `changed` (a test's own copy)."""
        sup = Supervisor.for_demo(changed or settings, poll_interval_s=0.1, **kwargs)
        made.append(sup)
        return sup

    yield make
    for sup in made:
        sup.stop(timeout_s=5)
        sup.close()


def _auth(sup: Supervisor) -> dict[str, str]:
    return {"Authorization": f"Bearer {sup.engine_api_key}"}


def _get(sup: Supervisor, path: str, **kwargs) -> httpx.Response:
    """GET on the engine (its private socket by default)."""
    return endpoint.request("GET", f"{sup.engine_url}{path}", 10.0, **kwargs)


def _socket_is_gone(settings: st.Settings) -> bool:
    path = endpoint.socket_path(settings.engine.container_name)
    return not endpoint.socket_answers(path) and not path.exists()


def test_start_phases_ready_chat_stop(settings, sim_env, make_supervisor) -> None:
    sup = make_supervisor()
    seen: list[EngineState] = []
    sup.add_listener(lambda s: seen.append(s.state) if not seen or seen[-1] != s.state else None)
    before = sup.version
    assert sup.start().state == EngineState.STARTING  # returns at once
    status = sup.wait_ready(60)
    assert status.state == EngineState.READY
    assert sup.version > before
    assert [p.name for p in status.phases] == list(phases.LOG_PHASES)
    assert all(p.done and p.elapsed_s >= 0 for p in status.phases)
    assert status.effective["kv_cache_tokens"] > 0
    assert status.effective["max_model_len"] == 262144
    assert status.served_model_name == "step3p7-flash"
    assert seen[0] == EngineState.STARTING
    assert seen[-1] == EngineState.READY

    # the engine listens on its private socket, not on a TCP port
    path = endpoint.socket_path(settings.engine.container_name)
    assert sup.engine_url == endpoint.socket_url(path)
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

    pid = int(status.container_id.split(":")[1])
    stopped = sup.stop()
    assert stopped.state == EngineState.STOPPED
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert _socket_is_gone(settings)
    assert sup.runtime.find(settings.engine.container_name) is None


HOLDER = textwrap.dedent(
    """
    import sys, time
    from appliance import settings as st
    from appliance.engine import Supervisor
    s = st.with_changes(st.Settings(), {"engine.port": int(sys.argv[1]),
                        "engine.profile": "fp8-tp1", "engine.container_name": sys.argv[2]})
    sup = Supervisor.for_demo(s)
    sup.attach()
    sup.start()
    sup.wait_ready(60)
    print("READY", sup.status().container_id, flush=True)
    time.sleep(600)
    """
)


def test_kill_9_of_the_appliance_then_adopt(settings, sim_env, make_supervisor) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(settings.engine.port), settings.engine.container_name],
        stdout=subprocess.PIPE,
        text=True,
        env=os.environ.copy(),
    )
    try:
        line = holder.stdout.readline().split()
        assert line[0] == "READY", line
        engine_id = line[1]
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    sup = make_supervisor()
    status = sup.attach()
    assert status.state == EngineState.READY  # at once: no waiting for a start
    assert status.container_id == engine_id
    assert "adopted" in status.message
    assert _get(sup, "/health").status_code == 200
    # asking to start again never starts a second engine
    assert sup.start().container_id == engine_id
    assert sup.status().state == EngineState.READY
    assert sup.stop().state == EngineState.STOPPED


def test_crash_after_ready_is_reported(settings, sim_env, make_supervisor) -> None:
    sim_env.setenv("STEP_SIM_FAULT", "crash")
    sim_env.setenv("STEP_SIM_FAULT_AFTER_S", "1")
    sup = make_supervisor()
    sup.start()
    sup.wait_ready(60)
    status = sup.status()
    while status.state == EngineState.READY:
        status = sup.wait_for_change(status.version, 30)
    assert status.state == EngineState.FAILED
    assert status.exit_code == 1
    assert "exited unexpectedly (exit code 1)" in status.message
    assert any("CUDA error" in line for line in status.log_tail)


def test_oom_at_start_retries_once_then_fails_clearly(settings, sim_env, make_supervisor) -> None:
    sim_env.setenv("STEP_SIM_FAULT", "oom")
    sup = make_supervisor()
    messages: list[str] = []
    sup.add_listener(lambda s: messages.append(s.message))
    sup.start()
    with pytest.raises(Exception, match="out of GPU memory") as info:
        sup.wait_ready(60)
    assert "retry with --gpu-memory-utilization 0.90 (was 0.95)" in str(info.value)
    status = sup.status()
    assert status.state == EngineState.FAILED
    assert status.oom
    assert status.exit_code == 1
    assert status.retry_note == "--gpu-memory-utilization 0.90 (was 0.95)"
    assert any("retrying once with --gpu-memory-utilization 0.90" in m for m in messages)
    assert status.effective["gpu_memory_utilization"] == 0.9  # the second attempt's value


def test_context_too_long_retries_with_the_estimate_and_serves(
    settings, sim_env, make_supervisor
) -> None:
    # leaves less KV cache than one 256K request
    settings = st.with_changes(settings, {"engine.gpu_memory_utilization": 0.89})
    sup = make_supervisor(settings)
    sup.start()
    status = sup.wait_ready(60)
    assert status.retry_note.startswith("--max-model-len ")
    assert "Started after one retry" in status.message
    new_len = int(status.retry_note.split()[1])
    assert 0 < new_len < 262144
    models = _get(sup, "/v1/models", headers=_auth(sup)).json()["data"]
    assert models[0]["max_model_len"] == new_len


def test_hang_during_load_hits_the_deadline(settings, sim_env, make_supervisor) -> None:
    sim_env.setenv("STEP_SIM_FAULT", "hang")
    settings = st.with_changes(settings, {"engine.start_timeout_s": 3})
    sup = make_supervisor(settings)
    sup.start()
    with pytest.raises(Exception, match="not ready after 3 s"):
        sup.wait_ready(60)
    status = sup.status()
    assert status.state == EngineState.FAILED
    assert "engine.start_timeout_s" in status.message
    handle = sup.runtime.find(settings.engine.container_name)
    assert handle is None or not sup.runtime.inspect(handle).running  # it was stopped


def test_engine_dead_health_503_fails_and_stops(settings, sim_env, make_supervisor) -> None:
    sim_env.setenv("STEP_SIM_FAULT", "dead")
    sim_env.setenv("STEP_SIM_FAULT_AFTER_S", "0.5")
    sup = make_supervisor()
    sup.start()
    sup.wait_ready(60)
    status = sup.status()
    while status.state == EngineState.READY:
        status = sup.wait_for_change(status.version, 30)
    assert status.state == EngineState.FAILED
    assert "/health 503" in status.message
    handle = sup.runtime.find(settings.engine.container_name)
    assert handle is None or not sup.runtime.inspect(handle).running


def test_port_already_taken(settings, sim_env, make_supervisor) -> None:
    settings = st.with_changes(settings, {"engine.listen": "tcp"})
    with socket.socket() as other:
        other.bind(("127.0.0.1", settings.engine.port))
        other.listen()
        sup = make_supervisor(settings)
        sup.start()
        with pytest.raises(Exception, match=f"Port {settings.engine.port} on 127.0.0.1"):
            sup.wait_ready(30)
        status = sup.status()
        assert status.state == EngineState.FAILED
        assert "engine.port" in status.message
        assert sup.runtime.find(settings.engine.container_name) is None  # nothing launched


def test_socket_already_answering(settings, sim_env, make_supervisor) -> None:
    """Something already listens on the engine's socket path (another engine of this name):
    the start fails at once, launches nothing, and leaves that socket alone."""
    path = endpoint.prepare_socket(settings.engine.container_name)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as other:
        other.bind(str(path))
        other.listen()
        sup = make_supervisor()
        sup.start()
        with pytest.raises(
            EngineError, match=f"Another engine already listens on {re.escape(str(path))}"
        ):
            sup.wait_ready(30)
        status = sup.status()
        assert status.state == EngineState.FAILED
        assert str(path) in status.message
        assert sup.runtime.find(settings.engine.container_name) is None  # nothing launched
        assert endpoint.socket_answers(path)  # the other listener's socket is untouched


def test_stale_socket_file_is_replaced(settings, sim_env, make_supervisor) -> None:
    """A socket file left by an engine that is gone (kill -9: vLLM never unlinks it) does not
    block the next start."""
    path = endpoint.prepare_socket(settings.engine.container_name)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as gone:
        gone.bind(str(path))  # bound, never listening, then closed: the file stays
    assert path.exists()
    assert not endpoint.socket_answers(path)
    sup = make_supervisor()
    sup.start()
    assert sup.wait_ready(60).state == EngineState.READY
    assert _get(sup, "/health").status_code == 200


def test_tcp_listen_serves_on_the_port(settings, sim_env, make_supervisor) -> None:
    """engine.listen = "tcp": the old behaviour, vLLM on 127.0.0.1:engine.port, no socket."""
    settings = st.with_changes(settings, {"engine.listen": "tcp"})
    sup = make_supervisor(settings)
    sup.start()
    sup.wait_ready(60)
    assert sup.engine_url == f"http://127.0.0.1:{settings.engine.port}"
    assert not port_is_free("127.0.0.1", settings.engine.port)
    assert not endpoint.socket_path(settings.engine.container_name).exists()
    assert httpx.get(f"{sup.engine_url}/health", timeout=10).status_code == 200
    assert sup.stop().state == EngineState.STOPPED
    assert port_is_free("127.0.0.1", settings.engine.port)


def test_changed_settings_ask_for_a_restart(settings, sim_env, make_supervisor) -> None:
    sup = make_supervisor()
    sup.start()
    sup.wait_ready(60)
    assert not sup.status().restart_needed
    changed = st.with_changes(
        settings, {"engine.runtime": "process", "engine.max_model_len": 65536}
    )
    status = sup.apply_settings(changed)
    assert status.restart_needed
    assert "restart" in status.message
    status = sup.restart()
    status = sup.wait_ready(60)
    assert not status.restart_needed
    assert _get(sup, "/v1/models", headers=_auth(sup)).json()["data"][0]["max_model_len"] == 65536


def test_stop_during_load_cancels_the_start(settings, sim_env, make_supervisor) -> None:
    sim_env.setenv("STEP_SIM_LOAD_S", "30")
    sup = make_supervisor()
    sup.start()
    status = sup.status()
    while status.phase not in (phases.LOADING_WEIGHTS, phases.COMPILING):
        status = sup.wait_for_change(status.version, 30)
    assert sup.stop().state == EngineState.STOPPED
    assert _socket_is_gone(settings)
    with pytest.raises(Exception, match="not starting"):
        sup.wait_ready(1)


def test_logs_are_readable_after_the_fact(settings, sim_env, make_supervisor, tmp_path: Path):
    sup = make_supervisor()
    sup.start()
    sup.wait_ready(60)
    lines = list(sup.iter_logs(follow=False))
    assert any("Starting vLLM server" in line for line in lines)
    assert not any("\r" in line for line in lines)


def test_idle_sleep_then_wake_on_demand(settings, sim_env, make_supervisor) -> None:
    settings = st.with_changes(settings, {"engine.sleep_mode": True})
    sup = make_supervisor(settings, idle_sleep_s=1.0)
    sup.start()
    status = sup.wait_ready(60)
    while status.state == EngineState.READY:
        status = sup.wait_for_change(status.version, 30)
    assert status.state == EngineState.SLEEPING
    assert _get(sup, "/is_sleeping").json() == {"is_sleeping": True}
    sup.ensure_awake()  # what the gateway and chat call before a request
    assert sup.status().state == EngineState.READY
    assert _get(sup, "/is_sleeping").json() == {"is_sleeping": False}


def test_sleep_needs_sleep_mode(settings, sim_env, make_supervisor) -> None:
    sup = make_supervisor()
    sup.start()
    sup.wait_ready(60)
    with pytest.raises(Exception, match=r"engine\.sleep_mode true"):
        sup.sleep()


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "appliance", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=os.environ | (env or {}),
    )


def test_cli_start_status_logs_stop(settings, sim_env, make_supervisor) -> None:
    st.save_settings(settings)
    watcher = Supervisor.for_demo(settings, outside_poll_s=0.2)  # the appliance, running
    try:
        assert watcher.attach().state == EngineState.ABSENT
        started = _cli("start", "--demo")
        assert started.returncode == 0, started.stderr
        lines = started.stdout.splitlines()
        # not a terminal: one plain line per phase, in order, then the summary
        for name in phases.LOG_PHASES[1:]:
            assert name in lines
        assert lines.index("Loading weights") < lines.index("Capturing CUDA graphs")
        path = endpoint.socket_path(settings.engine.container_name)
        assert any(line.startswith(f"Ready: unix socket {path} serves") for line in lines)
        assert "\r" not in started.stdout

        status = _cli("status", "--demo", "--json")
        assert status.returncode == 0
        data = json.loads(status.stdout)
        assert list(data)[:6] == [
            "state", "phase", "profile", "container_id", "engine_url", "message"
        ]  # fmt: skip
        assert data["state"] == "ready"
        assert data["profile"] == "fp8-tp1"
        assert data["engine_url"] == endpoint.socket_url(path)
        # the running appliance adopted what the CLI started
        seen = watcher.status()
        while seen.state != EngineState.READY:
            seen = watcher.wait_for_change(seen.version, 30)
        assert seen.container_id == data["container_id"]

        logs = _cli("logs", "--demo")
        assert logs.returncode == 0
        assert "Starting vLLM server" in logs.stdout

        stopped = _cli("stop", "--demo")
        assert stopped.returncode == 0
        assert "GPU memory is released" in stopped.stdout
        while seen.state == EngineState.READY:
            seen = watcher.wait_for_change(seen.version, 30)
        assert seen.state == EngineState.STOPPED  # and the appliance saw it stop
        after = _cli("status", "--demo")
        assert after.returncode == 10  # not running
    finally:
        watcher.close()


def test_cli_failed_start_exit_code_and_reason(settings, sim_env) -> None:
    st.save_settings(settings)
    failed = _cli("start", "--demo", env={"STEP_SIM_FAULT": "oom"})
    assert failed.returncode == 6
    assert "ran out of GPU memory while starting" in failed.stderr
    assert "  | " in failed.stderr  # the log tail follows the reason
    assert _cli("status", "--demo").returncode == 6
    _cli("stop", "--demo")
