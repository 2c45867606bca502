"""Helpers for the gateway tests: a gateway in front of a real engine, raw HTTP, the engine gauge.

Raw HTTP matters: httpx and the openai SDK normalise paths (`/v1/../metrics` becomes `/metrics`),
so path tricks are sent byte for byte over a socket.
"""

from __future__ import annotations

import base64
import io
import os
import socket
import struct
import time
import zlib
from dataclasses import dataclass, field

import openai
from fixtures.sim import free_port

from appliance import endpoint
from appliance import settings as st
from appliance.gateway import Gateway
from appliance.keys import KeyStore

MODEL = "step3p7-flash"


@dataclass
class RawResponse:
    status: int
    headers: dict[str, str]
    body: bytes
    raw: bytes = b""

    def json(self) -> dict:
        import json

        return json.loads(self.body)


def _dechunk(body: bytes) -> bytes:
    out = io.BytesIO()
    rest = body
    while rest:
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line.split(b";")[0] or b"0", 16)
        if size == 0:
            break
        out.write(rest[:size])
        rest = rest[size + 2 :]
    return out.getvalue()


def raw_request(host: str, port: int, data: bytes, timeout: float = 15.0) -> RawResponse:
    """Send bytes as they are; read until the server closes (requests say Connection: close)."""
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(data)
        chunks = []
        while True:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            chunks.append(chunk)
    raw = b"".join(chunks)
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1]) if lines and lines[0] else 0
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if headers.get("transfer-encoding", "").lower() == "chunked":
        body = _dechunk(body)
    return RawResponse(status, headers, body, raw)


def http(method: str, target: str, *, body: bytes = b"", headers: dict[str, str] | None = None):
    """A request as bytes with Connection: close (and Content-Length when there is a body)."""
    lines = [f"{method} {target} HTTP/1.1", "Host: 127.0.0.1", "Connection: close"]
    for name, value in (headers or {}).items():
        lines.append(f"{name}: {value}")
    if body and not any(k.lower() == "transfer-encoding" for k in (headers or {})):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def png_data_url(width: int = 64, height: int = 48, *, noise: bool = False) -> str:
    """A real PNG as a data URL: one colour, or random pixels (which do not compress)."""
    if noise:
        raw = b"".join(b"\x00" + os.urandom(3 * width) for _ in range(height))
    else:
        raw = b"".join(b"\x00" + b"\x80\x40\x20" * width for _ in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    png = (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )
    return "data:image/png;base64," + base64.b64encode(png).decode()


def running_requests(engine_url: str) -> float:
    """The engine's `vllm:num_requests_running` (sum over labels), read where the engine listens
    (its private socket, or loopback)."""
    response = endpoint.request("GET", f"{engine_url.rstrip('/')}/metrics", 5.0)
    response.raise_for_status()
    text = response.text
    total = 0.0
    for line in text.splitlines():
        if line.startswith("vllm:num_requests_running"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def wait_until(predicate, timeout_s: float = 10.0, interval_s: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval_s)
    return bool(predicate())


@dataclass
class GatewayStack:
    """A started Gateway (loopback) in front of an engine, with its key store."""

    gateway: Gateway
    keys: KeyStore
    settings: st.Settings
    engine_url: str
    made: list[str] = field(default_factory=list)

    @property
    def host(self) -> str:
        return self.gateway.host

    @property
    def port(self) -> int:
        return self.gateway.port

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def client(self, key: str = "no-key", **kwargs) -> openai.OpenAI:
        kwargs.setdefault("max_retries", 0)
        kwargs.setdefault("timeout", 60)
        return openai.OpenAI(base_url=self.base_url, api_key=key, **kwargs)

    def key(self, name: str) -> str:
        secret = self.keys.create(name).secret
        self.made.append(secret)
        return secret

    def raw(self, data: bytes, timeout: float = 15.0) -> RawResponse:
        return raw_request(self.host, self.port, data, timeout)


def start_gateway(settings: st.Settings, engine, engine_url: str, **kwargs) -> GatewayStack:
    if not settings.gateway.port:
        settings = st.with_changes(settings, {"gateway.port": free_port()})
    keys = KeyStore()
    gateway = Gateway(settings, keys, engine, **kwargs)
    gateway.start()
    return GatewayStack(gateway, keys, settings, engine_url)
