"""A small asyncio HTTP/1.1 server: keep-alive, chunked streaming, disconnect detection.

A request's handler runs as a task while the connection is watched for end-of-file, so a client
that hangs up cancels the handler, which is how vLLM aborts a request in the engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import traceback
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlsplit

MAX_HEADER = 64 * 1024
MAX_BODY = 256 * 1024 * 1024
REASONS = {
    200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found",
    405: "Method Not Allowed", 413: "Payload Too Large", 500: "Internal Server Error",
    503: "Service Unavailable",
}  # fmt: skip


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes
    peer: str = "127.0.0.1:0"

    def json(self) -> Any:
        return json.loads(self.body or b"null")


@dataclass
class Response:
    status: int = 200
    body: bytes = b""
    content_type: str | None = "application/json"
    headers: list[tuple[str, str]] = field(default_factory=list)

    @classmethod
    def json(cls, payload: Any, status: int = 200) -> Response:
        return cls(status, json.dumps(payload).encode())

    @classmethod
    def text(cls, text: str, content_type: str = "text/plain; charset=utf-8") -> Response:
        return cls(200, text.encode(), content_type)


@dataclass
class StreamResponse:
    chunks: AsyncIterator[bytes]
    status: int = 200
    content_type: str = "text/event-stream; charset=utf-8"
    headers: list[tuple[str, str]] = field(default_factory=list)


Handler = Callable[[Request], Coroutine[Any, Any, Response | StreamResponse]]
AccessLog = Callable[[Request, int], None]


class HttpServer:
    """Serves one handler on an already-bound socket (bound early, listening only when ready)."""

    def __init__(self, handler: Handler, access_log: AccessLog | None = None) -> None:
        self.handler = handler
        self.access_log = access_log
        self.server: asyncio.Server | None = None
        self.connections: set[asyncio.Task[None]] = set()

    async def start(self, sock: socket.socket) -> None:
        self.server = await asyncio.start_server(self._serve, sock=sock, limit=MAX_HEADER)

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for task in list(self.connections):
            task.cancel()
        await asyncio.gather(*self.connections, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.connections.add(task)
        peer = writer.get_extra_info("peername") or ("127.0.0.1", 0)
        conn = _Connection(reader, writer, f"{peer[0]}:{peer[1]}")
        try:
            while await self._one(conn):
                pass
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            self.connections.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _one(self, conn: _Connection) -> bool:
        request = await conn.read_request()
        if request is None:
            return False
        handling = asyncio.create_task(self.handler(request))
        hangup = asyncio.create_task(conn.wait_hangup())
        done, _ = await asyncio.wait({handling, hangup}, return_when=asyncio.FIRST_COMPLETED)
        if handling not in done:  # the client went away: cancel the work, as vLLM aborts
            handling.cancel()
            with contextlib.suppress(BaseException):
                await handling
            return False
        try:
            response = handling.result()
        except Exception:  # noqa: BLE001 - a bug must answer 500 and be logged, as uvicorn does
            traceback.print_exc()
            response = Response.json({"error": "Internal Server Error"}, 500)
        keep = request.headers.get("connection", "").lower() != "close"
        try:
            if isinstance(response, StreamResponse):
                await self._race_stream(conn, response, hangup)
            else:
                await conn.send(response, keep)
        finally:
            hangup.cancel()
            with contextlib.suppress(BaseException):
                await hangup
        if self.access_log is not None:
            self.access_log(request, response.status)
        return keep and not conn.closed

    async def _race_stream(
        self, conn: _Connection, response: StreamResponse, hangup: asyncio.Task[None]
    ) -> None:
        streaming = asyncio.create_task(self._stream(conn, response))
        done, _ = await asyncio.wait({streaming, hangup}, return_when=asyncio.FIRST_COMPLETED)
        if streaming in done:
            try:
                streaming.result()
            except ConnectionError:
                conn.closed = True
            except Exception:  # noqa: BLE001 - logged like uvicorn's "Exception in ASGI application"
                traceback.print_exc()
                conn.closed = True
            return
        conn.closed = True  # hung up mid-stream: cancelling the writer aborts the generation
        streaming.cancel()
        with contextlib.suppress(BaseException):
            await streaming

    async def _stream(self, conn: _Connection, response: StreamResponse) -> None:
        head = (
            f"HTTP/1.1 {response.status} {REASONS.get(response.status, '')}\r\n"
            f"content-type: {response.content_type}\r\ntransfer-encoding: chunked\r\n"
            "server: uvicorn\r\n" + "".join(f"{k}: {v}\r\n" for k, v in response.headers) + "\r\n"
        ).encode()
        conn.writer.write(head)
        chunks = response.chunks
        try:
            async for chunk in chunks:
                if conn.writer.is_closing():
                    conn.closed = True
                    return
                conn.writer.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                await conn.writer.drain()
            conn.writer.write(b"0\r\n\r\n")
            await conn.writer.drain()
        finally:
            aclose = getattr(chunks, "aclose", None)
            if aclose is not None:
                await aclose()


class _Connection:
    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: str
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.peer = peer
        self.buffer = bytearray()
        self.closed = False

    async def wait_hangup(self) -> None:
        """Returns when the client closes; bytes sent meanwhile (pipelining) are kept."""
        while True:
            data = await self.reader.read(65536)
            if not data:
                self.closed = True
                return
            self.buffer += data

    async def _fill(self) -> bool:
        data = await self.reader.read(65536)
        if not data:
            return False
        self.buffer += data
        return True

    async def read_request(self) -> Request | None:
        while b"\r\n\r\n" not in self.buffer:
            if len(self.buffer) > MAX_HEADER or not await self._fill():
                return None
        head, _, rest = bytes(self.buffer).partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        try:
            method, target, _version = lines[0].split(" ", 2)
        except ValueError:
            return None
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        body = bytearray(rest)
        if headers.get("transfer-encoding", "").lower() == "chunked":
            self.buffer = body
            body = await self._read_chunked()
        else:
            length = int(headers.get("content-length") or 0)
            if length > MAX_BODY:
                return None
            while len(body) < length:
                data = await self.reader.read(min(1 << 20, length - len(body)))
                if not data:
                    return None
                body += data
            self.buffer = bytearray(body[length:])
            body = body[:length]
        url = urlsplit(target)
        query = dict(parse_qsl(url.query))
        return Request(method.upper(), url.path or "/", query, headers, bytes(body), self.peer)

    async def _read_chunked(self) -> bytearray:
        body = bytearray()
        while True:
            while b"\r\n" not in self.buffer:
                if not await self._fill():
                    raise ConnectionError("eof in chunked body")
            size_line, _, rest = bytes(self.buffer).partition(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            self.buffer = bytearray(rest)
            while len(self.buffer) < size + 2:
                if not await self._fill():
                    raise ConnectionError("eof in chunked body")
            body += self.buffer[:size]
            del self.buffer[: size + 2]
            if size == 0:
                return body

    async def send(self, response: Response, keep: bool) -> None:
        lines = [f"HTTP/1.1 {response.status} {REASONS.get(response.status, '')}"]
        lines.append(f"content-length: {len(response.body)}")
        if response.content_type:
            lines.append(f"content-type: {response.content_type}")
        lines.append("server: uvicorn")
        if not keep:
            lines.append("connection: close")
        lines.extend(f"{k}: {v}" for k, v in response.headers)
        self.writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + response.body)
        await self.writer.drain()
