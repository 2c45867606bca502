"""`python -m appliance.simulator MODEL [vllm serve flags]`: start-up, serving, faults, shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
from collections.abc import Sequence

from appliance.simulator.args import ServeArgs, parse_args
from appliance.simulator.engine import Engine
from appliance.simulator.http import REASONS, HttpServer, Request
from appliance.simulator.knobs import KnobError, Knobs
from appliance.simulator.logs import API, CORE, VllmLog
from appliance.simulator.routes import Api
from appliance.simulator.startup import EngineFailedError, Startup


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)  # exits 2 like vLLM on bad flags
    try:
        knobs = Knobs.from_env()
    except KnobError as err:
        print(f"step simulator: {err}", file=sys.stderr)
        return 2
    with contextlib.suppress(KeyboardInterrupt):
        return asyncio.run(Simulator(args, knobs).run())
    return 0


def bind_early(host: str | None, port: int, uds: str | None = None) -> socket.socket:
    """Bind now, listen only when ready: vLLM reserves its port first, so the port answers
    "connection refused" while loading and a port in use fails at once. With `uds`, a Unix
    socket bound as vLLM's `create_server_unix_socket` does (0.32 launchers/launcher.py): no
    unlink of a file already there (bind fails), no chmod (the umask decides its mode)."""
    if uds:
        unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            unix.bind(uds)
        except OSError:
            unix.close()
            raise
        unix.setblocking(False)
        return unix
    bind_host = host or "0.0.0.0"
    family = socket.AF_INET6 if ":" in bind_host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((bind_host, port))
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


class Simulator:
    def __init__(self, args: ServeArgs, knobs: Knobs) -> None:
        self.args = args
        self.knobs = knobs
        self.log = VllmLog()
        self.stop = asyncio.Event()
        self.exit_code = 0

    async def run(self) -> int:
        log = self.log
        try:
            sock = bind_early(self.args.host, self.args.port, self.args.uds)
        except OSError as err:
            log.raw(f"OSError: [Errno {err.errno}] {err.strerror}")
            return 1
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.stop.set)
        startup = asyncio.create_task(Startup(self.args, self.knobs, log).run())
        stopping = asyncio.create_task(self.stop.wait())
        await asyncio.wait({startup, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if not startup.done():
            startup.cancel()
            log.info("Received termination signal; shutting down.", "api_server.py:1950")
            return 0
        stopping.cancel()
        try:
            memory = startup.result()
        except EngineFailedError:
            return 1
        engine = Engine(self.args, self.knobs, log, memory)
        api = Api(self.args, self.knobs, engine, memory)
        server = HttpServer(api.handle, self._access_log)
        if self.args.uds:
            address = f"unix:{self.args.uds}"
        else:
            address = f"http://{self.args.host or '0.0.0.0'}:{sock.getsockname()[1]}"
        log.info(f"Starting vLLM server on {address}", "launcher.py:44")
        log.info("Available routes are:", "launcher.py:37")
        for path, method in api.route_names():
            log.info(f"Route: {path}, Methods: {method}", "launcher.py:45")
        await server.start(sock)
        prefix = f"({API} pid={log.pids[API]}) "
        log.raw(f"{prefix}INFO:     Started server process [{os.getpid()}]")
        log.raw(f"{prefix}INFO:     Waiting for application startup.")
        log.raw(f"{prefix}INFO:     Application startup complete.")
        background = [asyncio.create_task(engine.log_stats_forever())]
        if self.knobs.fault in ("crash", "dead"):
            background.append(asyncio.create_task(self._engine_fault(engine)))
        await self.stop.wait()
        log.info("Shutting down FastAPI HTTP server.", "launcher.py:110")
        for task in background:
            task.cancel()
        await server.close()
        log.raw(f"{prefix}INFO:     Shutting down")
        log.raw(f"{prefix}INFO:     Waiting for application shutdown.")
        log.raw(f"{prefix}INFO:     Application shutdown complete.")
        return self.exit_code

    async def _engine_fault(self, engine: Engine) -> None:
        await asyncio.sleep(self.knobs.fault_after_s or 0.0)
        log = self.log
        log.error("EngineCore encountered a fatal error.", "core.py:710", CORE)
        log.raw(
            f"({CORE} pid={log.pids[CORE]}) Traceback (most recent call last):\n"
            '  File "/usr/local/lib/python3.12/dist-packages/vllm/v1/engine/core.py", '
            "line 701, in run_engine_core\n    engine_core.run_busy_loop()\n"
            "RuntimeError: CUDA error: an illegal memory access was encountered"
        )
        engine.die()
        log.error("AsyncLLM output_handler failed.", "async_llm.py:480")
        log.raw(
            "vllm.v1.engine.exceptions.EngineDeadError: EngineCore encountered an issue. "
            "See stack trace (above) for the root cause."
        )
        if self.knobs.fault == "crash":
            self.exit_code = 1
            self.stop.set()

    def _access_log(self, request: Request, status: int) -> None:
        if self.args.non_default.get("disable_uvicorn_access_log"):
            return
        self.log.raw(
            f"({API} pid={self.log.pids[API]}) INFO:     {request.peer} - "
            f'"{request.method} {request.path} HTTP/1.1" {status} {REASONS.get(status, "")}'
        )
