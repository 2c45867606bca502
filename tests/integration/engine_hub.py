"""A tiny Hugging Face Hub on 127.0.0.1 for the engine's weight-download tests.

It serves the few endpoints huggingface_hub's `snapshot_download` uses, with the Hub's headers:
`GET /api/models/{repo}/revision/{rev}`, `GET /api/models/{repo}/tree/{rev}`, and
`HEAD|GET /{repo}/resolve/{rev}/{file}` (`X-Repo-Commit`, `ETag`, `Content-Length`, ranges).
Errors use the Hub's `X-Error-Code` header (RepoNotFound, GatedRepo). Knobs per repo: gated, a
required token, a size to claim in the tree listing, a byte rate, a connection cut after N bytes.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse


@dataclass
class Repo:
    files: dict[str, bytes]
    sha: str = "0123456789abcdef0123456789abcdef01234567"
    gated: bool = False
    token: str = ""  # when set, requests must carry `Authorization: Bearer <token>`
    claimed_sizes: dict[str, int] = field(default_factory=dict)  # tree listing lies (disk test)
    bytes_per_s: float = 0.0  # 0: as fast as possible
    cut_after: int = 0  # drop the first GET of a file after this many bytes (resume test)
    cut_done: set[str] = field(default_factory=set)


class FakeHub:
    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str, str]] = []  # (method, path, Range header)
        self.bytes_served = 0
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> FakeHub:
        self._thread.start()
        return self

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def gets(self, suffix: str = "") -> list[tuple[str, str, str]]:
        return [r for r in self.requests if r[0] == "GET" and "/resolve/" in r[1] and
                r[1].endswith(suffix)]  # fmt: skip

    # ------------------------------------------------------------------------------ handler

    def _handler(self) -> type[BaseHTTPRequestHandler]:  # noqa: C901 - one branch per route
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                del format, args

            def do_HEAD(self) -> None:  # noqa: N802
                self._route(head=True)

            def do_GET(self) -> None:  # noqa: N802
                self._route(head=False)

            def _error(self, status: int, code: str = "", message: str = "") -> None:
                body = json.dumps({"error": message or code}).encode()
                self.send_response(status)
                if code:
                    self.send_header("X-Error-Code", code)
                if message:
                    self.send_header("X-Error-Message", message)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _json(self, data: object) -> None:
                body = json.dumps(data).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _repo(self, repo_id: str) -> Repo | None:
                repo = hub.repos.get(repo_id)
                if repo is None:
                    self._error(401, "RepoNotFound", "Repository not found")
                    return None
                auth = self.headers.get("Authorization", "")
                if repo.token and auth != f"Bearer {repo.token}":
                    if auth:
                        self._error(401, "", "Invalid credentials in Authorization header")
                    else:
                        self._error(401, "RepoNotFound", "Repository not found")
                    return None
                if repo.gated:
                    self._error(403, "GatedRepo", "Access to model is restricted")
                    return None
                return repo

            def _route(self, *, head: bool) -> None:
                path = unquote(urlparse(self.path).path)
                hub.requests.append((self.command, path, self.headers.get("Range", "")))
                parts = path.strip("/").split("/")
                if parts[:2] == ["api", "models"] and len(parts) >= 4:
                    repo_id = "/".join(parts[2:4])
                    repo = self._repo(repo_id)
                    if repo is None:
                        return
                    if len(parts) == 4 or parts[4] == "revision":
                        self._json({"id": repo_id, "sha": repo.sha, "siblings": [
                            {"rfilename": name} for name in repo.files]})  # fmt: skip
                        return
                    if parts[4] == "tree":
                        self._json([
                            {"type": "file", "path": name,
                             "size": repo.claimed_sizes.get(name, len(data)),
                             "oid": hashlib.sha1(data).hexdigest()}  # noqa: S324
                            for name, data in repo.files.items()
                        ])  # fmt: skip
                        return
                if len(parts) >= 5 and parts[2] == "resolve":
                    repo_id, name = "/".join(parts[:2]), "/".join(parts[4:])
                    repo = self._repo(repo_id)
                    if repo is None:
                        return
                    if name not in repo.files:
                        self._error(404, "EntryNotFound", "Entry not found")
                        return
                    self._file(repo, name, head=head)
                    return
                self._error(404, "", "Not found")

            def _file(self, repo: Repo, name: str, *, head: bool) -> None:
                data = repo.files[name]
                start = 0
                rng = self.headers.get("Range", "")
                if rng.startswith("bytes="):
                    start = int(rng[6:].split("-")[0] or 0)
                body = data[start:]
                self.send_response(206 if start else 200)
                self.send_header("X-Repo-Commit", repo.sha)
                self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
                self.send_header("Content-Length", str(len(body)))
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.send_header("Accept-Ranges", "bytes")
                self.end_headers()
                if head:
                    return
                cut = repo.cut_after if repo.cut_after and name not in repo.cut_done else 0
                sent = 0
                for offset in range(0, len(body), 16384):
                    chunk = body[offset : offset + 16384]
                    if cut and start + sent + len(chunk) > cut:
                        repo.cut_done.add(name)
                        self.wfile.write(chunk[: cut - start - sent])
                        self.wfile.flush()
                        self.close_connection = True
                        self.connection.shutdown(2)
                        return
                    self.wfile.write(chunk)
                    sent += len(chunk)
                    hub.bytes_served += len(chunk)
                    if repo.bytes_per_s:
                        time.sleep(len(chunk) / repo.bytes_per_s)

        return Handler
