"""Network stand-ins for the engine's Docker tests: a cuttable, throttled TCP/unix-socket proxy
(a registry that goes away mid-pull, a Docker daemon that goes away and comes back) and a private
`docker-registry` process on a free port (the shared one on 5000 is never touched)."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

from fixtures.sim import free_port


class Proxy:
    """Forwards `listen` -> `target`; `cut()` drops the listener and every connection,
    `resume()` listens again on the same address. Addresses: (host, port) or a unix path."""

    def __init__(
        self,
        target: tuple[str, int] | str,
        listen: tuple[str, int] | str | None = None,
        bytes_per_s: float = 0.0,
    ) -> None:
        self.target = target
        self.listen = listen or ("127.0.0.1", free_port())
        self.bytes_per_s = bytes_per_s
        self.bytes_forwarded = 0
        self._server: socket.socket | None = None
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()

    @staticmethod
    def _family(addr: tuple[str, int] | str) -> int:
        return socket.AF_UNIX if isinstance(addr, str) else socket.AF_INET

    def start(self) -> Proxy:
        server = socket.socket(self._family(self.listen), socket.SOCK_STREAM)
        if isinstance(self.listen, str):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.listen)
        else:
            server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(self.listen)
        server.listen(64)
        self._server = server
        threading.Thread(target=self._accept, args=(server,), daemon=True).start()
        return self

    resume = start

    @property
    def port(self) -> int:
        assert not isinstance(self.listen, str)
        return self.listen[1]

    def _accept(self, server: socket.socket) -> None:
        while True:
            try:
                client, _ = server.accept()
            except OSError:
                return
            try:
                upstream = socket.socket(self._family(self.target), socket.SOCK_STREAM)
                upstream.connect(self.target)
            except OSError:
                client.close()
                continue
            with self._lock:
                if self._server is not server:  # cut while this one was being connected
                    client.close()
                    upstream.close()
                    return
                self._conns += [client, upstream]
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
                self.bytes_forwarded += len(data)
                if self.bytes_per_s:
                    time.sleep(len(data) / self.bytes_per_s)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        with self._lock:
            server, self._server = self._server, None
            conns, self._conns = self._conns, []
        if server is not None:
            with contextlib.suppress(OSError):
                server.shutdown(socket.SHUT_RDWR)  # wakes the accept() blocked on it
            server.close()
        for sock in conns:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        if isinstance(self.listen, str):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.listen)

    close = cut


class Registry:
    """A private Distribution registry (`docker-registry serve`) on 127.0.0.1:<free port>."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> Registry:
        (self.root / "data").mkdir(parents=True, exist_ok=True)
        config = self.root / "config.yml"
        config.write_text(
            "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n"
            f"    rootdirectory: {self.root / 'data'}\n  delete:\n    enabled: true\n"
            f"http:\n  addr: {self.address}\n"
        )
        self.process = subprocess.Popen(
            ["docker-registry", "serve", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=(self.root / "registry.log").open("wb"),
            start_new_session=True,
        )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"http://{self.address}/v2/", timeout=1).close()
                return self
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"registry on {self.address} did not start")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
