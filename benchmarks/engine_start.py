"""Engine manager overhead, measured side by side with the bare engine (the simulator).

    .venv/bin/python benchmarks/engine_start.py [--runs 5] [--load-s 3] [--write]

For the Docker runtime (the simulator image from the local registry) and the process runtime:
- start: click (Supervisor.start) to READY, and the bare engine's own time to /health 200
  (`docker run` / a subprocess, polled every 10 ms); appliance overhead = click-to-ready minus the
  simulator's configured load time, and minus the bare engine's time;
- stop: Supervisor.stop() until nothing answers on the engine's socket (or port, with
  engine.listen = tcp) and the container is gone (Docker frees the GPU when the container's
  processes exit);
- adoption: a fresh supervisor's attach() to READY on a running engine (the "restart after kill
  -9" case);
- crash detection: the container's FinishedAt to the supervisor reporting FAILED.
Medians of `--runs`. `--write` replaces the engine section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import docker
import httpx
from docker.types import Mount

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from appliance import endpoint  # noqa: E402
from appliance import settings as st  # noqa: E402
from appliance.engine import EngineState, Supervisor  # noqa: E402
from appliance.engine.docker_runtime import parse_docker_time  # noqa: E402
from appliance.engine.health import port_is_free  # noqa: E402
from appliance.engine.launch import launch_spec_for  # noqa: E402
from benchmarks.common import free_port, write_section  # noqa: E402

SIM_IMAGE = os.environ.get("STEP_SIM_IMAGE", "localhost:5000/vllm/vllm-openai:stepfun37")
BEGIN, END = "<!-- engine_start:begin -->", "<!-- engine_start:end -->"


def settings_for(runtime: str) -> st.Settings:
    return st.with_changes(
        st.Settings(),
        {
            "engine.runtime": runtime,
            "engine.profile": "fp8-tp1",
            "engine.request_gpu": False,
            "engine.image": SIM_IMAGE,
            "engine.port": free_port(),
            "engine.container_name": f"ssbench-{uuid.uuid4().hex[:8]}",
        },
    )


def supervisor(s: st.Settings, demo: bool) -> Supervisor:
    if demo:
        return Supervisor.for_demo(s, outside_poll_s=0)
    return Supervisor(s, download_weights=False, outside_poll_s=0)


def wait_health(url: str, timeout: float = 120.0) -> float:
    """Poll /health on the engine's socket (or TCP URL) until 200."""
    began = time.monotonic()
    with endpoint.client(url, timeout=0.5) as client:  # one client: polling must not eat the CPU
        while time.monotonic() - began < timeout:
            try:
                if client.get("/health").status_code == 200:
                    return time.monotonic() - began
            except httpx.HTTPError:
                pass
            time.sleep(0.01)
    raise RuntimeError(f"{url} not ready")


def engine_gone(s: st.Settings) -> bool:
    """Nothing answers where the engine listened: its socket, or its port with listen = tcp."""
    if endpoint.uses_socket(s.engine):
        return not endpoint.socket_answers(endpoint.socket_path(s.engine.container_name))
    return port_is_free("127.0.0.1", s.engine.port)


def bare_docker(dk: docker.DockerClient, load_s: float) -> float:
    """The same engine by `docker run`: its socket folder mounted, the same network."""
    s = settings_for("docker")
    spec = launch_spec_for(s, secrets=st.Secrets(), download_weights=False)
    endpoint.prepare_socket(s.engine.container_name)
    endpoint.remove_socket(s.engine.container_name)
    began = time.monotonic()
    container = dk.containers.run(
        SIM_IMAGE,
        list(spec.args),
        detach=True,
        name=s.engine.container_name,
        environment={"STEP_SIM_LOAD_S": str(load_s)},
        network_mode=spec.container_network,
        mounts=[Mount(endpoint.CONTAINER_SOCKET_DIR, spec.socket_dir, type="bind")],
    )
    try:
        wait_health(spec.engine_url)
        return time.monotonic() - began
    finally:
        container.remove(force=True)
        endpoint.remove_socket(s.engine.container_name)


def bare_process(load_s: float) -> float:
    s = settings_for("process")
    spec = launch_spec_for(s, secrets=st.Secrets(), demo=True, download_weights=False)
    endpoint.prepare_socket(s.engine.container_name)
    endpoint.remove_socket(s.engine.container_name)
    began = time.monotonic()
    proc = subprocess.Popen(
        [*spec.executable, *spec.args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=os.environ | {"STEP_SIM_LOAD_S": str(load_s)},
    )
    try:
        wait_health(spec.engine_url)
        return time.monotonic() - began
    finally:
        proc.terminate()
        proc.wait(10)
        endpoint.remove_socket(s.engine.container_name)


def managed(runtime: str, runs: int, bare: Callable[[], float]) -> dict[str, list[float]]:
    """Alternates a bare start and a managed one, so machine load drifts affect both alike."""
    demo = runtime == "process"
    out: dict[str, list[float]] = {"bare": [], "ready": [], "stop": [], "adopt": []}
    for _ in range(runs):
        out["bare"].append(bare())
        s = settings_for(runtime)
        sup = supervisor(s, demo)
        began = time.monotonic()
        sup.start()
        sup.wait_ready(120)
        out["ready"].append(time.monotonic() - began)
        other = supervisor(s, demo)
        began = time.monotonic()
        assert other.attach().state == EngineState.READY
        out["adopt"].append(time.monotonic() - began)
        other.close()
        began = time.monotonic()
        sup.stop()
        while not engine_gone(s) or sup.runtime.find(s.engine.container_name):
            time.sleep(0.005)
        out["stop"].append(time.monotonic() - began)
        sup.close()
    return out


def crash_detection(dk: docker.DockerClient, runs: int) -> list[float]:
    os.environ["STEP_SIM_FAULT"], os.environ["STEP_SIM_FAULT_AFTER_S"] = "crash", "1"
    latencies = []
    try:
        for _ in range(runs):
            s = settings_for("docker")
            sup = supervisor(s, demo=False)
            sup.start()
            status = sup.wait_ready(120)
            while status.state == EngineState.READY:
                status = sup.wait_for_change(status.version, 30)
            seen = time.time()
            finished = dk.api.inspect_container(status.container_id)["State"]["FinishedAt"]
            latencies.append(seen - (parse_docker_time(finished) or seen))
            sup.stop()
            sup.close()
    finally:
        del os.environ["STEP_SIM_FAULT"], os.environ["STEP_SIM_FAULT_AFTER_S"]
    return latencies


def med(values: list[float]) -> float:
    return statistics.median(values)


def spread(values: list[float]) -> str:
    return f"{med(values):.2f} s ({min(values):.2f}-{max(values):.2f})"


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--load-s", type=float, default=3.0)
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    os.environ["STEP_STATION_HOME"] = tempfile.mkdtemp(prefix="ssbench-")
    os.environ["STEP_SIM_LOAD_S"] = str(args.load_s)
    dk = docker.from_env()
    rows: list[tuple[str, float, dict[str, list[float]]]] = []
    for runtime in ("docker", "process"):
        if runtime == "docker":
            got = managed(runtime, args.runs, lambda: bare_docker(dk, args.load_s))
        else:
            got = managed(runtime, args.runs, lambda: bare_process(args.load_s))
        bare = got["bare"]
        rows.append((runtime, med(bare), got))
        print(
            f"{runtime}: bare {med(bare):.2f} s, click-to-ready {med(got['ready']):.2f} s, "
            f"stop {med(got['stop']):.2f} s, adopt {med(got['adopt']):.3f} s",
            flush=True,
        )
    crash = crash_detection(dk, min(args.runs, 3))
    lines = [
        BEGIN,
        "## Engine start and stop (`benchmarks/engine_start.py`)",
        "",
        f"Simulator with `STEP_SIM_LOAD_S={args.load_s:g}`, medians of {args.runs} runs, on the "
        "2-core development machine (Docker 20.10, simulator image from the local registry). "
        "Appliance overhead = click-to-ready minus the configured load time; the bare engine "
        "column is the same engine started without the appliance (`docker run` or a "
        "subprocess, /health polled every 10 ms), so the last column is what the supervisor "
        "itself adds. Ranges are min-max; the machine is shared with other test runs, so "
        "differences below the spread are noise.",
        "",
        "| runtime | bare engine to ready | click to ready | overhead vs load time | "
        "overhead vs bare | ratio click/bare | stop to socket closed + container gone | "
        "attach() to ready (adopt) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for runtime, bare_ready, got in rows:
        ready = med(got["ready"])
        lines.append(
            f"| {runtime} | {spread(got['bare'])} | {spread(got['ready'])} | "
            f"{ready - args.load_s:.2f} s | "
            f"{ready - bare_ready:.2f} s | {ready / bare_ready:.2f} | {med(got['stop']):.2f} s | "
            f"{1000 * med(got['adopt']):.0f} ms |"
        )
    lines += [
        "",
        f"Crash detection (container FinishedAt to FAILED, Docker, median of {len(crash)}): "
        f"{med(crash):.2f} s (poll every 1 s plus the log stream ending).",
        "",
        f"Run: `.venv/bin/python benchmarks/engine_start.py --runs {args.runs} "
        f"--load-s {args.load_s:g} --write` ({time.strftime('%Y-%m-%d')}).",
        END,
    ]
    text = "\n".join(lines)
    print(text)
    if args.write:
        write_section(BEGIN, END, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
