"""A small HTTP/1.1 client for the one upstream the gateway has: the engine on loopback.

Why not httpx: under 64 concurrent streams its connection pool spends most of the gateway's CPU
scanning connections (measured: ~40% of samples in `_assign_requests_to_connections`), and each
chunk passes through several layers of async generators. This client is an `asyncio.Protocol`
with httptools' C parser: bytes that arrive are parsed in `data_received`, queued on the response,
and a reader takes everything queued in one call, so under load a single downstream write may
carry several events (never holding any back).

- Back-pressure: past `HIGH_WATER` unread bytes the engine connection stops reading (TCP pushes
  back on the engine); it resumes below `LOW_WATER`. Memory per stream stays bounded.
- Cancel: `UpstreamResponse.abort()` closes the connection; that is how vLLM learns the client
  went away and aborts the request.
- Keep-alive: a fully read response returns its connection to the pool; connections idle for
  longer than `IDLE_S` are closed rather than reused (the engine's keep-alive timeout is 5 s).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque

import httptools

HIGH_WATER = 1 << 20
LOW_WATER = 256 << 10
IDLE_S = 3.0
MAX_IDLE = 256
CONNECT_TIMEOUT_S = 5.0


class UpstreamError(Exception):
    """The engine could not be reached, or broke the connection before answering."""


class UpstreamResponse:
    """Status and headers, then the body as it arrives (`read()` returns b"" at the end)."""

    def __init__(self, conn: _Connection) -> None:
        self._conn = conn
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.keep_alive = False
        self.complete = False
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._error: Exception | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._head: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def header(self, name: bytes) -> bytes:
        for key, value in self.headers:
            if key == name:
                return value
        return b""

    # --- fed by the protocol

    def _headers_done(self) -> None:
        if not self._head.done():
            self._head.set_result(None)

    def _feed(self, data: bytes) -> None:
        self._chunks.append(data)
        self._buffered += len(data)
        if self._buffered > HIGH_WATER:
            self._conn.pause()
        self._wake()

    def _finish(self) -> None:
        self.complete = True
        self._wake()

    def _fail(self, error: Exception) -> None:
        if self.complete:
            return
        self._error = error
        if not self._head.done():
            self._head.set_exception(error)
            self._head.exception()  # retrieved here; `wait_head` raises it again
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # --- used by the gateway

    async def wait_head(self) -> None:
        await self._head

    async def read(self) -> bytes:
        """Everything that arrived since the last call; waits when nothing has; b"" at the end."""
        while not self._chunks:
            if self.complete:
                return b""
            if self._error is not None:
                raise self._error
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        data = self._chunks[0] if len(self._chunks) == 1 else b"".join(self._chunks)
        self._chunks.clear()
        if self._buffered > LOW_WATER:
            self._conn.resume()
        self._buffered = 0
        return data

    def abort(self) -> None:
        """Drop the connection (the engine aborts the request)."""
        self._conn.close()

    def release(self) -> None:
        """Return the connection to the pool when the response was read to the end."""
        self._conn.done(self)


class _Connection(asyncio.Protocol):
    def __init__(self, pool: UpstreamPool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.response: UpstreamResponse | None = None
        self.parser: httptools.HttpResponseParser | None = None
        self.closed = False
        self.paused = False
        self.idle_since = 0.0

    # --- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if self.parser is None:
            self.close()  # bytes nobody asked for: this connection is not usable any more
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as err:
            if self.response is not None:
                self.response._fail(UpstreamError(f"bad HTTP from the engine: {err}"))
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.response is not None:
            self.response._fail(UpstreamError("the engine closed the connection"))

    # --- httptools callbacks

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.response is not None:
            self.response.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        if self.response is not None and self.parser is not None:
            self.response.status = self.parser.get_status_code()
            self.response.keep_alive = self.parser.should_keep_alive()
            self.response._headers_done()

    def on_body(self, body: bytes) -> None:
        if self.response is not None:
            self.response._feed(body)

    def on_message_complete(self) -> None:
        if self.response is not None:
            self.response._finish()

    # --- helpers

    def send(self, head: bytes, body: bytes) -> UpstreamResponse:
        assert self.transport is not None
        self.response = UpstreamResponse(self)
        self.parser = httptools.HttpResponseParser(self)
        self.transport.write(head + body if len(body) < 65536 else head)
        if len(body) >= 65536:
            self.transport.write(body)
        return self.response

    def pause(self) -> None:
        if not self.paused and self.transport is not None and not self.closed:
            self.paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        if self.paused and self.transport is not None and not self.closed:
            self.paused = False
            self.transport.resume_reading()

    def close(self) -> None:
        if not self.closed and self.transport is not None:
            self.closed = True
            self.transport.close()

    def done(self, response: UpstreamResponse) -> None:
        if self.response is not response:
            return
        self.response = None
        self.parser = None
        if response.complete and response.keep_alive and not self.closed and not self.paused:
            self.idle_since = time.monotonic()
            self.pool._put(self)
        else:
            self.close()


class UpstreamPool:
    """Keep-alive connections to one engine: (host, port), or its Unix socket `uds`."""

    def __init__(self, host: str, port: int, *, uds: str | None = None) -> None:
        self.host = host
        self.port = port
        self.uds = uds
        self._idle: deque[_Connection] = deque()

    def _put(self, conn: _Connection) -> None:
        self._idle.append(conn)
        while len(self._idle) > MAX_IDLE:
            self._idle.popleft().close()

    def _take(self) -> _Connection | None:
        now = time.monotonic()
        while self._idle:
            conn = self._idle.pop()  # most recently used first: least likely to be stale
            if not conn.closed and now - conn.idle_since < IDLE_S:
                return conn
            conn.close()
        return None

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            if self.uds:
                connecting = loop.create_unix_connection(lambda: _Connection(self), self.uds)
            else:
                connecting = loop.create_connection(lambda: _Connection(self), self.host, self.port)
            _, protocol = await asyncio.wait_for(connecting, CONNECT_TIMEOUT_S)
        except (OSError, asyncio.TimeoutError) as err:
            where = f"unix socket {self.uds}" if self.uds else f"{self.host}:{self.port}"
            raise UpstreamError(f"cannot connect to the engine at {where}") from err
        return protocol

    async def request(self, head: bytes, body: bytes) -> UpstreamResponse:
        """Send one request; returns once the status and headers arrived."""
        conn = self._take()
        if conn is not None:
            response = conn.send(head, body)
            try:
                await response.wait_head()
                return response
            except UpstreamError:
                # A reused connection the engine had just closed: it never saw the request.
                conn.close()
            except BaseException:
                conn.close()  # cancelled (the client left): the engine must see it too
                raise
        conn = await self._connect()
        response = conn.send(head, body)
        try:
            await response.wait_head()
        except BaseException:
            conn.close()
            raise
        return response

    def sweep(self) -> None:
        """Close connections idle for longer than IDLE_S (they would not be reused)."""
        now = time.monotonic()
        keep = deque(c for c in self._idle if not c.closed and now - c.idle_since < IDLE_S)
        for conn in self._idle:
            if conn not in keep:
                conn.close()
        self._idle = keep

    def close(self) -> None:
        while self._idle:
            self._idle.pop().close()


def request_head(method: str, path: str, host: str, headers: list[tuple[str, str]]) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}"]
    lines.extend(f"{name}: {value}" for name, value in headers)
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
