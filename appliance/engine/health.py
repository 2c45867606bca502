"""Small checks the supervisor makes: `/health`, sleep endpoints, "is this port free"."""

from __future__ import annotations

import errno
import socket

import httpx

from appliance import endpoint
from appliance.errors import PortInUseError


def probe_health(base_url: str, timeout_s: float = 1.0) -> int | None:
    """HTTP status of `GET /health`, or None when nothing answers (the socket or port is not
    listening yet).

    vLLM listens only when ready, so "connection refused" means loading; Docker's proxy may
    accept and then drop the connection, which reads the same here. One pooled client per engine
    (endpoint.shared_client) serves these once-a-second probes.
    """
    try:
        response = endpoint.request("GET", f"{base_url}/health", timeout_s)
    except httpx.HTTPError:
        return None
    return response.status_code


def post(base_url: str, path: str, timeout_s: float = 30.0) -> int | None:
    try:
        response = endpoint.request("POST", f"{base_url}{path}", timeout_s)
    except httpx.HTTPError:
        return None
    return response.status_code


def is_sleeping(base_url: str, timeout_s: float = 2.0) -> bool | None:
    """`GET /is_sleeping` (dev mode); None when the engine does not answer it."""
    try:
        response = endpoint.request("GET", f"{base_url}/is_sleeping", timeout_s)
        if response.status_code != 200:
            return None
        return bool(response.json().get("is_sleeping"))
    except (httpx.HTTPError, ValueError, AttributeError):
        return None


def ensure_port_free(host: str, port: int, setting: str = "engine.port") -> None:
    """Raise PortInUseError naming the port when another program listens on it."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # SO_REUSEADDR: a TIME_WAIT from a previous run is not "in use"; a listener still is.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as err:
            if err.errno != errno.EADDRINUSE:
                raise PortInUseError(f"Cannot use {host}:{port} ({err.strerror}).") from err
            raise PortInUseError(
                f"Port {port} on {host} is already in use by another program.",
                hint=f"Stop that program, or choose another port with "
                f"`step-station config set {setting} PORT`.",
            ) from err


def port_is_free(host: str, port: int) -> bool:
    try:
        ensure_port_free(host, port)
    except PortInUseError:
        return False
    return True
