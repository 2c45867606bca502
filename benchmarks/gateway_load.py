"""Gateway load: 200 concurrent streaming clients for 60 s, no errors, memory flat.

Starts the simulator (on a private Unix socket, as the appliance's engine) and the gateway
(`python -m appliance.gateway --require-key`, its own process, loopback only) with a fresh key,
then runs N clients that stream chat completions back to back for D seconds. One request in ten
is dropped by its client after a few events (that request must end in the engine too). Samples
the gateway's RSS and open file descriptors every second. Prints requests, tokens, errors, the
RSS curve (after a warm-up), and, after the load, the engine's running-request gauge (must
return to 0) and the gateway's descriptors.

Usage: .venv/bin/python benchmarks/gateway_load.py [--clients 200] [--seconds 60] [--rate 50]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python benchmarks/<name>.py`

from appliance import endpoint  # noqa: E402
from appliance.keys import KeyStore  # noqa: E402
from benchmarks.common import free_port  # noqa: E402
from benchmarks.gateway_throughput import MODEL, ROOT, Connection, wait_http  # noqa: E402


def running_gauge(engine_url: str) -> float:
    text = endpoint.request("GET", f"{engine_url}/metrics", 5.0).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("vllm:num_requests_running")
    )


class Abort(Exception):
    """Raised inside a stream to drop the connection on purpose."""


async def client(
    url: str, key: str, deadline: float, stats: dict[str, Any], rng: random.Random
) -> None:
    path = "/v1/chat/completions"
    conn = Connection(url, key)
    try:
        while time.monotonic() < deadline:
            drop = rng.random() < 0.1
            payload = {
                "model": MODEL,
                "messages": [{"role": "user", "content": f"story {rng.randint(0, 10**6)}"}],
                "max_tokens": rng.randint(64, 384),
                "ignore_eos": True,
                "reasoning_effort": rng.choice(["low", "medium", "high"]),
                "stream": True,
                "stream_options": {"include_usage": True},
            }
            seen = {"n": 0}

            def on_event(seen: dict[str, int] = seen, drop: bool = drop) -> None:
                seen["n"] += 1
                if drop and seen["n"] >= 5:
                    raise Abort

            try:
                result = await conn.stream(path, payload, on_event)
            except Abort:
                stats["dropped"] += 1
                await conn.close()
                continue
            except (OSError, asyncio.IncompleteReadError) as err:
                stats["errors"].append(repr(err))
                await conn.close()
                continue
            if not result.ok or result.completion_tokens != payload["max_tokens"]:
                got = f"{result.completion_tokens}/{payload['max_tokens']} tokens"
                stats["errors"].append(f"{result.status} {result.error[:200]} {got}")
                await conn.close()
                continue
            stats["requests"] += 1
            stats["tokens"] += result.completion_tokens
    finally:
        await conn.close()


async def run_load(
    url: str, key: str, clients: int, seconds: float, proc: psutil.Process
) -> dict[str, Any]:
    stats: dict[str, Any] = {
        "requests": 0,
        "tokens": 0,
        "dropped": 0,
        "errors": [],
        "rss": [],
        "fds": [],
    }
    deadline = time.monotonic() + seconds
    started = time.monotonic()

    async def sample() -> None:
        while time.monotonic() < deadline:
            stats["rss"].append((time.monotonic() - started, proc.memory_info().rss))
            stats["fds"].append(proc.num_fds())
            await asyncio.sleep(1.0)

    rngs = [random.Random(i) for i in range(clients)]
    await asyncio.gather(sample(), *(client(url, key, deadline, stats, rngs[i])
                                     for i in range(clients)))  # fmt: skip
    stats["seconds"] = time.monotonic() - started
    return stats


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--rate", type=float, default=50.0, help="simulator tokens/s per stream")
    parser.add_argument("--warmup", type=float, default=10.0, help="seconds before RSS baseline")
    parser.add_argument("--json", default="", help="also write the results to this file")
    args = parser.parse_args()

    home = tempfile.mkdtemp(prefix="step-station-load-")
    env = dict(os.environ)
    env.update(
        STEP_STATION_HOME=home,
        STEP_SIM_LOAD_S="0",
        STEP_SIM_TOKENS_PER_S=str(args.rate),
        STEP_SIM_TTFT_MS="50",
    )
    os.environ["STEP_STATION_HOME"] = home
    key = KeyStore().create("load-test").secret
    gw_port = free_port()
    sim_socket = f"{tempfile.mkdtemp(prefix='ssload-sock-')}/{endpoint.SOCKET_NAME}"
    procs: list[subprocess.Popen[bytes]] = []
    try:
        sim = subprocess.Popen(
            [sys.executable, "-m", "appliance.simulator", "stepfun-ai/Step-3.7-Flash-FP8",
             "--served-model-name", MODEL, "--uds", sim_socket,
             "--tensor-parallel-size", "1", "--gpu-memory-utilization", "0.95",
             "--kv-cache-dtype", "fp8", "--reasoning-parser", "step3p5",
             "--max-num-seqs", str(max(256, args.clients))],
            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        procs.append(sim)
        engine_url = endpoint.socket_url(sim_socket)
        wait_http(f"{engine_url}/health")
        gw = subprocess.Popen(
            [sys.executable, "-m", "appliance.gateway", "--engine-url", engine_url,
             "--port", str(gw_port), "--model", MODEL, "--require-key"],
            cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
        )  # fmt: skip
        procs.append(gw)
        url = f"http://127.0.0.1:{gw_port}/v1"
        wait_http(f"{url}/models")
        proc = psutil.Process(gw.pid)
        idle_fds = proc.num_fds()
        idle_rss = proc.memory_info().rss
        print(
            f"{args.clients} streaming clients for {args.seconds:.0f} s through the gateway "
            f"(simulator {args.rate:g} tokens/s per stream, {os.cpu_count()} CPUs)"
        )
        stats = asyncio.run(run_load(url, key, args.clients, args.seconds, proc))
        time.sleep(2.0)  # let dropped requests end in the engine
        after_gauge = running_gauge(engine_url)
        after_fds = proc.num_fds()
        after_rss = proc.memory_info().rss
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(10)

    rss = [(t, r / 2**20) for t, r in stats["rss"]]
    steady = [r for t, r in rss if t >= args.warmup]
    first_half = steady[: len(steady) // 2] or steady
    second_half = steady[len(steady) // 2 :] or steady
    growth = statistics.median(second_half) - statistics.median(first_half)
    errors = stats["errors"]
    summary = {
        "clients": args.clients,
        "seconds": round(stats["seconds"], 1),
        "rate_per_stream": args.rate,
        "requests_completed": stats["requests"],
        "requests_dropped_by_client": stats["dropped"],
        "tokens": stats["tokens"],
        "tokens_per_s": round(stats["tokens"] / stats["seconds"]),
        "errors": len(errors),
        "rss_mib_idle": round(idle_rss / 2**20, 1),
        "rss_mib_at_warmup": round(steady[0], 1) if steady else None,
        "rss_mib_peak": round(max(r for _, r in rss), 1),
        "rss_mib_end": round(rss[-1][1], 1),
        "rss_mib_after": round(after_rss / 2**20, 1),
        "rss_mib_growth_second_half_vs_first": round(growth, 1),
        "fds_idle": idle_fds,
        "fds_peak": max(stats["fds"]),
        "fds_after": after_fds,
        "engine_running_after": after_gauge,
    }
    print(json.dumps(summary, indent=2))
    print("RSS MiB every 5 s:", " ".join(f"{r:.0f}" for t, r in rss[::5]))
    if errors:
        print("first errors:", errors[:5])
    if args.json:
        Path(args.json).write_text(json.dumps({**summary, "rss_curve": rss}, indent=2))
    ok = not errors and after_gauge == 0
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
