"""Gateway throughput: 64 concurrent streams, through the gateway vs direct to the engine, one run.

Starts the simulator (`python -m appliance.simulator`, loopback) and the gateway alone
(`python -m appliance.gateway`, loopback, its own process) unless URLs are given, then runs rounds
that alternate direct / gateway with the same load: N concurrent streaming clients, each sending
R requests of T output tokens back to back. Per round: aggregate output tokens/s (from the usage
the engine reports) and the median time to first token. Prints each round and the ratios:

    tokens/s through the gateway / direct   (goal >= 0.95)
    median TTFT through the gateway - direct (goal < 5 ms)

The client is a small raw-asyncio HTTP/1.1 client (keep-alive, chunked), so it costs the same
in both arms and little CPU. The simulator listens on a private Unix socket, as the appliance's
engine does (`vllm serve --uds`, appliance/endpoint.py): the direct arm dials that socket, the
gateway's upstream too; the gateway binds 127.0.0.1.

Usage: .venv/bin/python benchmarks/gateway_throughput.py [--streams 64] [--rate 350]
       [--tokens 512] [--requests 3] [--rounds 3] [--engine-url URL --gateway-url URL]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # for `python benchmarks/gateway_throughput.py`

from appliance import endpoint  # noqa: E402
from benchmarks.common import free_port  # noqa: E402

MODEL = "step3p7-flash"
_TOKEN_EVENT = re.compile(rb'"(?:content|reasoning|reasoning_content|text)":\s*"[^"]')
_USAGE_EVENT = re.compile(rb'"choices":\s*\[\]')


# ------------------------------------------------------------------------------------ client


@dataclass
class StreamResult:
    ok: bool
    status: int = 0
    ttft_s: float | None = None
    completion_tokens: int = 0
    events: int = 0
    error: str = ""


class Connection:
    """One keep-alive HTTP/1.1 connection that sends a POST and reads a (chunked) SSE reply."""

    def __init__(self, url: str, key: str = "") -> None:
        self.uds, http_url = endpoint.split(url)  # the engine's socket URL, or a TCP one
        parts = urlsplit(http_url)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 80
        self.key = key
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def _open(self) -> None:
        if self.writer is None or self.writer.is_closing():
            if self.uds:
                self.reader, self.writer = await asyncio.open_unix_connection(self.uds)
            else:
                self.reader, self.writer = await asyncio.open_connection(self.host, self.port)

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(Exception):
                await self.writer.wait_closed()
            self.writer = None

    async def stream(
        self, path: str, payload: dict[str, Any], on_event: Callable[[], None] | None = None
    ) -> StreamResult:
        body = json.dumps(payload).encode()
        auth = f"Authorization: Bearer {self.key}\r\n" if self.key else ""
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n{auth}\r\n"
        ).encode()
        await self._open()
        assert self.reader is not None
        assert self.writer is not None
        started = time.perf_counter()
        self.writer.write(head + body)
        await self.writer.drain()
        status_line = await self.reader.readline()
        if not status_line:
            await self.close()
            return StreamResult(False, error="connection closed")
        status = int(status_line.split()[1])
        headers: dict[str, str] = {}
        while True:
            line = await self.reader.readline()
            if line in (b"\r\n", b"\n", b""):
                break
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        result = StreamResult(status == 200, status)
        pending = b""
        async for data in self._body(headers):
            pending += data
            end = pending.rfind(b"\n\n")
            if end < 0:
                continue
            complete, pending = pending[: end + 2], pending[end + 2 :]
            for event in complete.split(b"\n\n")[:-1]:
                if _TOKEN_EVENT.search(event):
                    result.events += 1
                    if result.ttft_s is None:
                        result.ttft_s = time.perf_counter() - started
                    if on_event is not None:
                        on_event()
                elif b'"usage"' in event and _USAGE_EVENT.search(event):
                    usage = json.loads(event[event.index(b"{") :])["usage"]
                    result.completion_tokens = int(usage["completion_tokens"])
                elif b'"error"' in event:
                    result.ok = False
                    result.error = event[:200].decode("utf-8", "replace")
        if headers.get("connection", "").lower() == "close":
            await self.close()
        if status != 200:
            result.error = pending[:300].decode("utf-8", "replace")
        return result

    async def _body(self, headers: dict[str, str]) -> AsyncIterator[bytes]:
        assert self.reader is not None
        if headers.get("transfer-encoding", "").lower() == "chunked":
            while True:
                size_line = await self.reader.readline()
                size = int(size_line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    await self.reader.readline()
                    return
                data = await self.reader.readexactly(size)
                await self.reader.readexactly(2)
                yield data
        else:
            length = int(headers.get("content-length", "0"))
            if length:
                yield await self.reader.readexactly(length)


def chat_payload(tokens: int, stream_usage: bool = True) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Write a long story about a lighthouse."}],
        "max_tokens": tokens,
        "ignore_eos": True,
        "reasoning_effort": "low",
        "stream": True,
    }
    if stream_usage:
        payload["stream_options"] = {"include_usage": True}
    return payload


# ------------------------------------------------------------------------------------ rounds


@dataclass
class Round:
    arm: str
    seconds: float = 0.0
    tokens: int = 0
    requests: int = 0
    errors: list[str] = field(default_factory=list)
    ttfts: list[float] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    @property
    def median_ttft_ms(self) -> float:
        return statistics.median(self.ttfts) * 1000 if self.ttfts else float("nan")


async def run_round(
    arm: str, url: str, key: str, streams: int, requests: int, tokens: int
) -> Round:
    result = Round(arm)
    path = _path(url) + "/chat/completions"

    async def worker() -> None:
        conn = Connection(url, key)
        try:
            for _ in range(requests):
                res = await conn.stream(path, chat_payload(tokens))
                result.requests += 1
                if not res.ok:
                    result.errors.append(f"{res.status} {res.error}")
                    await conn.close()
                    continue
                result.tokens += res.completion_tokens
                if res.ttft_s is not None:
                    result.ttfts.append(res.ttft_s)
        except Exception as err:
            result.errors.append(repr(err))
        finally:
            await conn.close()

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(streams)))
    result.seconds = time.perf_counter() - started
    return result


def _path(url: str) -> str:
    """The URL's path (`/v1`), for a socket URL too."""
    return urlsplit(endpoint.split(url)[1]).path.rstrip("/")


async def idle_ttft(url: str, key: str, samples: int) -> list[float]:
    path = _path(url) + "/chat/completions"
    conn = Connection(url, key)
    out = []
    try:
        for _ in range(samples):
            res = await conn.stream(path, chat_payload(8))
            if res.ttft_s is not None:
                out.append(res.ttft_s)
    finally:
        await conn.close()
    return out


# ----------------------------------------------------------------------------- processes


def wait_http(url: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if endpoint.request("GET", url, 1.0).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not come up in {timeout_s} s")


@contextlib.contextmanager
def started_stack(
    rate: float, ttft_ms: float, max_seqs: int
) -> Iterator[tuple[str, str, list[int]]]:
    """Simulator (on its socket) + gateway (on loopback) processes; yields (engine_url,
    gateway_url, pids)."""
    env = dict(os.environ)
    env.update(
        STEP_SIM_LOAD_S="0",
        STEP_SIM_TOKENS_PER_S=str(rate),
        STEP_SIM_TTFT_MS=str(ttft_ms),
        STEP_STATION_HOME=env.get("STEP_STATION_HOME", "/tmp/step-station-bench"),
    )
    gw_port = free_port()
    folder = tempfile.mkdtemp(prefix="ssbench-sock-")  # 0700, as the appliance's socket folder
    sim_socket = f"{folder}/{endpoint.SOCKET_NAME}"
    procs: list[subprocess.Popen[bytes]] = []
    try:
        sim = subprocess.Popen(
            [sys.executable, "-m", "appliance.simulator", "stepfun-ai/Step-3.7-Flash-FP8",
             "--served-model-name", MODEL, "--uds", sim_socket,
             "--tensor-parallel-size", "1", "--gpu-memory-utilization", "0.95",
             "--kv-cache-dtype", "fp8", "--reasoning-parser", "step3p5",
             "--max-num-seqs", str(max_seqs)],
            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        procs.append(sim)
        engine_url = endpoint.socket_url(sim_socket)
        wait_http(f"{engine_url}/health")
        gw = subprocess.Popen(
            [sys.executable, "-m", "appliance.gateway", "--engine-url", engine_url,
             "--port", str(gw_port), "--model", MODEL],
            cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
        )  # fmt: skip
        procs.append(gw)
        gateway_url = f"http://127.0.0.1:{gw_port}/v1"
        wait_http(f"{gateway_url}/models")
        yield f"{engine_url}/v1", gateway_url, [sim.pid, gw.pid]
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(folder, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=64)
    parser.add_argument("--rate", type=float, default=350.0, help="simulator tokens/s per stream")
    parser.add_argument("--ttft-ms", type=float, default=50.0, help="simulator time to first token")
    parser.add_argument("--tokens", type=int, default=512, help="output tokens per request")
    parser.add_argument("--requests", type=int, default=3, help="requests per stream per round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per arm (alternating)")
    parser.add_argument("--idle-samples", type=int, default=30)
    parser.add_argument("--engine-url", default="", help="use a running engine (…/v1)")
    parser.add_argument("--gateway-url", default="", help="use a running gateway (…/v1)")
    parser.add_argument("--key", default="", help="API key for the gateway, if it needs one")
    parser.add_argument("--json", default="", help="also write the results to this file")
    args = parser.parse_args()

    with contextlib.ExitStack() as stack:
        if args.engine_url and args.gateway_url:
            engine_url, gateway_url = args.engine_url, args.gateway_url
        else:
            engine_url, gateway_url, _ = stack.enter_context(
                started_stack(args.rate, args.ttft_ms, max(256, args.streams))
            )
        arms = {"direct": (engine_url, ""), "gateway": (gateway_url, args.key)}
        print(
            f"{args.streams} streams x {args.requests} requests x {args.tokens} tokens per round, "
            f"simulator {args.rate:g} tokens/s per stream, {os.cpu_count()} CPUs"
        )
        # Warm both paths (connections, first-request costs) before measuring.
        for url, key in arms.values():
            asyncio.run(run_round("warm", url, key, min(8, args.streams), 1, 32))
        idle = {
            arm: asyncio.run(idle_ttft(url, key, args.idle_samples))
            for arm, (url, key) in arms.items()
        }
        rounds: list[Round] = []
        for i in range(args.rounds):
            for arm in ("direct", "gateway") if i % 2 == 0 else ("gateway", "direct"):
                url, key = arms[arm]
                r = asyncio.run(run_round(arm, url, key, args.streams, args.requests, args.tokens))
                rounds.append(r)
                print(
                    f"  round {i + 1} {arm:8s} {r.tokens_per_s:9.0f} tok/s  "
                    f"median TTFT {r.median_ttft_ms:7.2f} ms  {r.requests} requests  "
                    f"{len(r.errors)} errors {r.errors[:1]}"
                )
    by_arm = {arm: [r for r in rounds if r.arm == arm] for arm in arms}
    tps = {arm: statistics.median(r.tokens_per_s for r in rs) for arm, rs in by_arm.items()}
    ttft = {
        arm: statistics.median([t for r in rs for t in r.ttfts] or [float("nan")]) * 1000
        for arm, rs in by_arm.items()
    }
    idle_ms = {arm: statistics.median(v) * 1000 for arm, v in idle.items() if v}
    errors = sum(len(r.errors) for r in rounds)
    summary = {
        "streams": args.streams,
        "rate_per_stream": args.rate,
        "tokens_per_request": args.tokens,
        "cpus": os.cpu_count(),
        "tokens_per_s": tps,
        "ratio": tps["gateway"] / tps["direct"],
        "median_ttft_ms_under_load": ttft,
        "ttft_added_ms_under_load": ttft["gateway"] - ttft["direct"],
        "median_ttft_ms_idle": idle_ms,
        "ttft_added_ms_idle": idle_ms.get("gateway", 0) - idle_ms.get("direct", 0),
        "errors": errors,
    }
    print(
        f"aggregate tokens/s: direct {tps['direct']:.0f}, gateway {tps['gateway']:.0f}, "
        f"ratio {summary['ratio']:.3f} (goal >= 0.95)"
    )
    print(
        f"median TTFT under load: direct {ttft['direct']:.2f} ms, gateway {ttft['gateway']:.2f} "
        f"ms, added {summary['ttft_added_ms_under_load']:.2f} ms; idle single stream: added "
        f"{summary['ttft_added_ms_idle']:.2f} ms (goal < 5 ms); errors {errors}"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))
    return 0 if errors == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
