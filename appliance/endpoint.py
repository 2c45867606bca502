"""Where the engine listens, and how the appliance's clients reach it.

By default (`engine.listen = "socket"`) vLLM serves on a Unix socket (`vllm serve --uds PATH`)
in a folder only the appliance's user can enter, not on a TCP port. vLLM's API key covers only
its `/v1` routes (0.32 `entrypoints/serve/middleware/register.py`: the AuthenticationMiddleware
lets every path outside `/v1` through), so on a loopback TCP port any local account could call
`/tokenize`, `/pause`, `/abort_requests`, `/metrics`, and with sleep mode `/sleep` and
`/collective_rpc`. On the socket, the folder's mode is the lock: the kernel refuses `connect()` to
anyone who cannot enter it. The container gets no network at all (or Docker's bridge with nothing
published, when the engine must download its weights itself), so no other container reaches it.

`engine.listen = "tcp"` keeps vLLM on 127.0.0.1:`engine.port` (the host's network), for tools
that must talk to vLLM directly; docs/security.md says what that opens.

The engine's address travels as a URL string (`EngineStatus.engine_url`, the gateway's and the
chat's base URL): `http://127.0.0.1:8001`, or for the socket
`http+unix://%2Fhome%2Fowner%2F...%2Fengine.sock` (the path percent-encoded as the host, the
convention of requests-unixsocket). `client()`, `async_client()`, `openai_kwargs()` and `split()`
turn it into a connection; nothing else parses it.

The socket's mode: in a container vLLM runs as root, and its socket would be root's 0755, which
the owner could not `connect()` to. The socket folder is setgid with the owner's group, so the
socket the engine creates there belongs to that group, and the container's entrypoint runs vLLM
with `umask 007`, so the group may connect. Others cannot enter the 0700 folder at all.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import socket
import stat
import threading
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

import httpx

from appliance import settings as st
from appliance.errors import EngineError, PortInUseError, SettingsError

SCHEME = "http+unix://"
SOCKET_NAME = "engine.sock"
# Inside the container: the socket folder, mounted read-write.
CONTAINER_SOCKET_DIR = "/run/step-station-socket"
CONTAINER_SOCKET = f"{CONTAINER_SOCKET_DIR}/{SOCKET_NAME}"
# What clients send as Host over the socket (vLLM does not check it).
SOCKET_HOST = "engine"
# Set by docker/compose.yaml: the data folder is the host's, at the same path (the host's Docker
# mounts the socket folder into the engine by that path).
SHARED_DATA_ENV = "STEP_STATION_SHARED_DATA"
# sockaddr_un.sun_path is 108 bytes on Linux, the terminating NUL included.
MAX_SOCKET_PATH = 107


def uses_socket(engine: st.EngineSettings) -> bool:
    if engine.listen not in ("socket", "tcp"):
        raise SettingsError(
            f"engine.listen is {engine.listen!r}; it must be socket or tcp.",
            hint="`step-station config set engine.listen socket` (the private default).",
        )
    return engine.listen == "socket"


def socket_url(path: str | os.PathLike[str]) -> str:
    return SCHEME + quote(str(path), safe="")


def tcp_url(engine: st.EngineSettings) -> str:
    return f"http://127.0.0.1:{engine.port}"


def engine_url(engine: st.EngineSettings) -> str:
    """The engine's address as the appliance's clients use it."""
    if uses_socket(engine):
        return socket_url(socket_path(engine.container_name))
    return tcp_url(engine)


def split(url: str) -> tuple[str | None, str]:
    """(socket path or None, the http:// URL to request over it).

    `split("http+unix://%2Fr%2Fengine.sock/v1/models")` is `("/r/engine.sock",
    "http://engine/v1/models")`; a TCP URL comes back as is with None."""
    if not url.startswith(SCHEME):
        return None, url
    rest = url[len(SCHEME) :]
    host, slash, tail = rest.partition("/")
    return unquote(host), f"http://{SOCKET_HOST}{slash}{tail}"


def describe(url: str) -> str:
    """The address for people: `unix socket /path` or the URL."""
    path, _ = split(url)
    return f"unix socket {path}" if path else url


# ----------------------------------------------------------------------------- clients


def client(url: str, **kwargs: Any) -> httpx.Client:
    """An httpx client whose `base_url` is the engine (socket or TCP); `trust_env` off, so a
    proxy set in the environment never carries the engine's key."""
    path, base = split(url.rstrip("/"))
    transport = httpx.HTTPTransport(uds=path) if path else None
    return httpx.Client(base_url=base, transport=transport, trust_env=False, **kwargs)


def async_client(url: str, **kwargs: Any) -> httpx.AsyncClient:
    path, base = split(url.rstrip("/"))
    transport = httpx.AsyncHTTPTransport(uds=path) if path else None
    return httpx.AsyncClient(base_url=base, transport=transport, trust_env=False, **kwargs)


def openai_kwargs(url: str, **client_kwargs: Any) -> dict[str, Any]:
    """`OpenAI(**openai_kwargs(url), api_key=...)`: base_url at `/v1`, and for the socket an
    http_client that dials it."""
    path, base = split(url.rstrip("/"))
    kwargs: dict[str, Any] = {"base_url": f"{base}/v1"}
    if path:
        kwargs["http_client"] = httpx.Client(
            transport=httpx.HTTPTransport(uds=path), trust_env=False, **client_kwargs
        )
    return kwargs


_pool_lock = threading.Lock()
_pools: dict[str, httpx.Client] = {}


def shared_client(url: str) -> httpx.Client:
    """One pooled client per engine (its URL without a path) for the once-a-second probes: a new
    client per probe cost ~30 ms of CPU, a quarter of the idle appliance's."""
    root = _root_url(url)
    with _pool_lock:
        pool = _pools.get(root)
        if pool is None or pool.is_closed:
            pool = _pools[root] = client(root)
        return pool


def _root_url(url: str) -> str:
    """`url` without its path: the engine itself."""
    if url.startswith(SCHEME):
        return SCHEME + url[len(SCHEME) :].split("/", 1)[0]
    parsed = httpx.URL(url)
    return f"{parsed.scheme}://{parsed.netloc.decode()}"


def request(method: str, url: str, timeout_s: float, **kwargs: Any) -> httpx.Response:
    """One request to a full engine URL (`{engine_url}/metrics`) on the shared pool."""
    root = _root_url(url)
    path = url[len(root) :] or "/"
    return shared_client(root).request(method, path, timeout=timeout_s, **kwargs)


# ----------------------------------------------------------------------------- the socket


def socket_dir(name: str) -> Path:
    """The engine's private socket folder (see `private_socket_dir`)."""
    return private_socket_dir("engine-sockets", name)


def private_socket_dir(kind: str, name: str) -> Path:
    """A private folder for a Unix socket: `<data>/<kind>/<name>`, or, when that path is too long
    for a socket address, a folder under a private `/tmp/step-station-<uid>` (checked: ours, a
    folder, 0700)."""
    preferred = st.data_dir() / kind / name
    if len(str(preferred)) + len("/control.sock") <= MAX_SOCKET_PATH:  # room for either name
        return preferred
    if os.environ.get(SHARED_DATA_ENV) == "1":
        # The appliance in a container (docker/compose.yaml): the host's Docker mounts the folder
        # into the engine by its path, so it must be the shared data folder, not this /tmp.
        raise SettingsError(
            f"The socket under {st.data_dir()} would be longer than a socket address "
            f"allows ({MAX_SOCKET_PATH} bytes).",
            hint="Give the appliance's container a shorter STEP_STATION_DIR "
            "(docker/compose.yaml: /var/lib/step-station).",
        )
    digest = hashlib.sha256(f"{st.data_dir()}\0{kind}\0{name}".encode()).hexdigest()[:16]
    return Path("/tmp") / f"step-station-{os.getuid()}" / digest


def prepare_private_dir(folder: Path, mode: int = 0o700) -> Path:
    """Create `folder` (and its parent) private to this account; a folder in /tmp that another
    account made first is refused, not used."""
    if folder.parent.parent == Path("/tmp"):
        _own_private_folder(folder.parent, 0o700)
    else:
        st.private_dir(folder.parent)
    _own_private_folder(folder, mode)
    return folder


def socket_path(name: str) -> Path:
    return socket_dir(name) / SOCKET_NAME


def _own_private_folder(path: Path, mode: int) -> None:
    """Create `path` (mode), or accept it only when it is a real folder of ours that nobody else
    can enter: a folder in /tmp that another account made first is refused, not used."""
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=mode)
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
        raise EngineError(
            f"{path} is not a folder of this account; the engine's socket cannot go there.",
            hint=f"Remove {path} (another account may have made it), then start again.",
        )
    os.chmod(path, mode)


def prepare_socket(name: str) -> Path:
    """Make the socket folder private (0700, setgid: see the module's docstring); raise
    PortInUseError when something answers on the socket already (another engine of this name).
    A socket file left by an engine that is gone stays until `remove_socket` (an engine still
    loading has bound it without listening yet: only the runtime knows whether it is gone)."""
    folder = prepare_private_dir(socket_dir(name), 0o2700)
    path = folder / SOCKET_NAME
    if socket_answers(path):
        raise PortInUseError(
            f"Another engine already listens on {path}.",
            hint="Stop it (`step-station stop`), or set another `engine.container_name`.",
        )
    return path


def socket_answers(path: str | os.PathLike[str]) -> bool:
    """Whether something accepts connections on the Unix socket `path`."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(str(path))
        except OSError as err:
            if err.errno in (errno.ENOENT, errno.ECONNREFUSED, errno.ENOTSOCK):
                return False
            raise
        return True


def remove_socket(name: str) -> None:
    """Remove the socket file an engine that is gone left (vLLM binds it and never unlinks it;
    a new bind on an existing file fails)."""
    with contextlib.suppress(FileNotFoundError, PermissionError):
        socket_path(name).unlink()
