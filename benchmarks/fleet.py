"""Fleet: aggregate tokens/s of two engines behind the front vs one, and the router hop's TTFT.

All in one run, on loopback, real parts: simulators (`python -m appliance.simulator`, each a
capacity-bound engine: `--max-num-seqs` slots at `STEP_SIM_TOKENS_PER_S` each, so one engine's
ceiling is slots x rate, as a GPU's batch is), gateways (`python -m appliance.gateway`), and
vllm-router started by the front gateway (appliance/fleet).

1. Throughput: C concurrent clients send chat completions for D seconds through
   (a) a front gateway alone on engine A, (b) a front gateway with member m2 (a gateway on engine
   B holding the fleet key): the router spreads over A and B. Prints completion tokens/s and
   the ratio b/a.
2. Router hop: one streaming request at a time, N times each, time to first content byte:
   engine direct vs vllm-router -> engine (the hop alone), and front without fleet vs front with
   fleet (router + the member's gateway). Prints medians and the differences.

Usage: .venv/bin/python benchmarks/fleet.py [--clients 32] [--seconds 15] [--samples 300]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python benchmarks/<name>.py`

from appliance import endpoint  # noqa: E402
from appliance.fleet import members as fm  # noqa: E402
from appliance.fleet.router import router_binary  # noqa: E402
from benchmarks.common import free_port  # noqa: E402

MODEL = "step3p7-flash"
CHECKPOINT = "stepfun-ai/Step-3.7-Flash-FP8"  # the simulator sizes its memory by it
ROOT = Path(__file__).resolve().parents[1]
KEY = fm.KEY_PREFIX + "b" * 32


def _engine_ok(url: str) -> bool:
    try:
        return endpoint.request("GET", f"{url}/health", 2.0).status_code == 200
    except httpx.HTTPError:
        return False


def wait_ok(url: str, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"{url} did not answer 200 in {timeout:.0f} s")


def spawn(argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    out = log.open("wb")
    return subprocess.Popen(argv, env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT)


def simulator(uds: Path, slots: int, rate: float, log: Path) -> subprocess.Popen[bytes]:
    """An engine on a Unix socket, as the appliance runs vLLM (engine.listen = "socket")."""
    env = {"STEP_SIM_LOAD_S": "0.2", "STEP_SIM_TTFT_MS": "5", "STEP_SIM_TOKENS_PER_S": str(rate)}
    argv = [sys.executable, "-m", "appliance.simulator", "--model", CHECKPOINT,
            "--served-model-name", MODEL, "--uds", str(uds), "--max-num-seqs", str(slots),
            "--gpu-memory-utilization", "0.95", "--kv-cache-dtype", "fp8",
            "--disable-uvicorn-access-log"]  # fmt: skip
    return spawn(argv, env, log)


def gateway(port: int, engine: str, home: Path, log: Path, *extra: str) -> subprocess.Popen[bytes]:
    argv = [sys.executable, "-m", "appliance.gateway", "--engine-url", engine, "--port",
            str(port), "--model", MODEL, *extra]  # fmt: skip
    return spawn(argv, {"STEP_STATION_HOME": str(home)}, log)


async def throughput(base: str, key: str, clients: int, seconds: float) -> tuple[float, int]:
    """(completion tokens/s, errors) of `clients` back-to-back requests for `seconds`."""
    tokens = errors = 0
    end = time.monotonic() + seconds
    body = {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 64}
    headers = {"Authorization": f"Bearer {key}"}
    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(base_url=base, timeout=60, limits=limits) as client:

        async def one(i: int) -> None:
            nonlocal tokens, errors
            n = 0
            while time.monotonic() < end:
                body["messages"] = [{"role": "user", "content": f"client {i} request {n}"}]
                n += 1
                reply = await client.post("/v1/chat/completions", json=body, headers=headers)
                if reply.status_code != 200:
                    errors += 1
                    continue
                tokens += int(reply.json()["usage"]["completion_tokens"])

        start = time.monotonic()
        await asyncio.gather(*(one(i) for i in range(clients)))
        return tokens / (time.monotonic() - start), errors


def ttft(base: str, key: str, samples: int) -> float:
    """Median ms from sending a streamed request (one write, as a raw socket: a client that
    writes head and body apart meets Nagle + delayed ACK, ~40 ms, on every hop) to its first
    content chunk; each request on a new connection, read to its end."""
    host, port = base.removeprefix("http://").split(":")
    times = []
    for i in range(samples + 5):
        body = json.dumps(
            {
                "model": MODEL,
                "stream": True,
                "max_tokens": 2,
                "messages": [{"role": "user", "content": f"ttft {i}"}],
            }
        ).encode()
        head = (
            f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}:{port}\r\n"
            f"Authorization: Bearer {key}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        ).encode()
        with socket.create_connection((host, int(port)), timeout=30) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            start = time.perf_counter()
            sock.sendall(head + body)
            seen, first = b"", None
            while chunk := sock.recv(65536):
                seen += chunk
                if first is None and b'"content"' in seen:
                    first = time.perf_counter()
        if first is None:
            raise SystemExit(f"no content from {base}: {seen[:200]!r}")
        if i >= 5:  # warm-up
            times.append((first - start) * 1000)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--samples", type=int, default=300)
    parser.add_argument("--slots", type=int, default=8, help="each engine's --max-num-seqs")
    parser.add_argument("--rate", type=float, default=100.0, help="tokens/s per request")
    args = parser.parse_args()
    if not router_binary():
        raise SystemExit("vllm-router is not installed: pip install -e '.[fleet]'")
    tmp = Path(tempfile.mkdtemp(prefix="fleet-bench-"))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        ua, ub = tmp / "a.sock", tmp / "b.sock"
        procs += [simulator(ua, args.slots, args.rate, tmp / "sim-a.log"),
                  simulator(ub, args.slots, args.rate, tmp / "sim-b.log")]  # fmt: skip
        engine_a, engine_b = endpoint.socket_url(ua), endpoint.socket_url(ub)
        for url in (engine_a, engine_b):
            end = time.monotonic() + 60
            while not _engine_ok(url):
                if time.monotonic() > end:
                    raise SystemExit(f"the simulator on {url} did not start; see {tmp}")
                time.sleep(0.2)
        homes = {name: tmp / name for name in ("alone", "front", "member")}
        for name in ("front", "member"):
            fm.store_key(KEY, homes[name] / "data" / "fleet.key")
        alone, front, member, router = free_port(), free_port(), free_port(), free_port()
        procs.append(gateway(member, engine_b, homes["member"], tmp / "member.log"))
        wait_ok(f"http://127.0.0.1:{member}/health")
        procs.append(gateway(alone, engine_a, homes["alone"], tmp / "alone.log"))
        procs.append(
            gateway(front, engine_a, homes["front"], tmp / "front.log",
                    "--fleet", f"m2=http://127.0.0.1:{member}", "--fleet-policy", "round_robin")
        )  # fmt: skip
        # The router alone in front of one gateway: its hop, and nothing else, added.
        argv = [router_binary(), "--host", "127.0.0.1", "--port", str(router),
                "--prometheus-port", str(free_port()), "--policy", "round_robin",
                "--health-check-endpoint", "/health",
                "--worker-urls", f"http://127.0.0.1:{member}"]  # fmt: skip
        procs.append(spawn(argv, {}, tmp / "router-alone.log"))
        wait_ok(f"http://127.0.0.1:{alone}/v1/models")
        wait_ok(f"http://127.0.0.1:{router}/health")
        status = tmp / "front" / "data" / "fleet-status.json"
        end = time.monotonic() + 60
        while '"healthy"' not in (status.read_text() if status.exists() else ""):
            if time.monotonic() > end:
                raise SystemExit(f"the front's fleet did not come up; see {tmp}")
            time.sleep(0.2)
        load = os.getloadavg()
        print(f"cores: {psutil.cpu_count()} (shared), load before: {load[0]:.2f} {load[1]:.2f}")
        print(f"engines: {args.slots} slots x {args.rate:.0f} tok/s each; "
              f"{args.clients} clients, {args.seconds:.0f} s per setup")  # fmt: skip
        one, e1 = asyncio.run(
            throughput(f"http://127.0.0.1:{alone}", "x", args.clients, args.seconds)
        )
        two, e2 = asyncio.run(
            throughput(f"http://127.0.0.1:{front}", "x", args.clients, args.seconds)
        )
        print(f"front alone (1 engine):     {one:8.0f} tok/s  errors {e1}")
        print(f"front + member (2 engines): {two:8.0f} tok/s  errors {e2}")
        print(f"ratio: {two / one:.2f}x   (ceiling per engine {args.slots * args.rate:.0f} tok/s)")
        n = args.samples
        direct = ttft(f"http://127.0.0.1:{member}", KEY, n)
        routed = ttft(f"http://127.0.0.1:{router}", KEY, n)
        front_alone = ttft(f"http://127.0.0.1:{alone}", "x", n)
        front_fleet = ttft(f"http://127.0.0.1:{front}", "x", n)
        print(f"TTFT median of {n}: gateway {direct:.2f} ms, router->gateway {routed:.2f} ms "
              f"(router hop +{routed - direct:.2f} ms)")  # fmt: skip
        print(f"TTFT median of {n}: front alone {front_alone:.2f} ms, front with fleet "
              f"{front_fleet:.2f} ms (+{front_fleet - front_alone:.2f} ms: router + a second "
              "gateway hop)")  # fmt: skip
        load = os.getloadavg()
        print(f"load after: {load[0]:.2f} {load[1]:.2f}")
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
