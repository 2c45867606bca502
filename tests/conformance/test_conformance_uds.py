"""`vllm serve --uds PATH`: the engine on a Unix socket, as the appliance runs it by default
(appliance/endpoint.py), the simulator against the real vLLM 0.32 (CPU build, tiny std model).

What the appliance relies on: the socket is bound at once and accepts connections only when the
engine is ready (connection refused while loading, as the TCP port); --host and --port are then
ignored; the start log names the socket; the socket's mode is what the umask leaves (no chmod:
the container's `umask 007` lets the owner's group connect); a file already at the path fails the
start (no unlink: the appliance removes a stale one itself), with a log line the phase parser
reads as ADDRESS_IN_USE. Every request goes through appliance.endpoint, the appliance's client.
"""

from __future__ import annotations

import os
import shutil
import socket
import stat
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from fixtures.realvllm import SERVED, require_real_vllm, start_real_vllm
from fixtures.sim import start_simulator

from appliance import endpoint
from appliance.engine import phases
from appliance.engine.phases import PhaseTracker

pytestmark = [
    pytest.mark.timeout(1200),
    pytest.mark.skipif(
        bool(os.environ.get("STEP_CONFORMANCE_URL")), reason="starts its own engines"
    ),
]

TARGETS = [pytest.param("process", id="process"), pytest.param("real-std", id="real-std")]


def _start(target: str, log_dir: Path, *, uds: bool | str = True, wait: bool = True) -> Any:
    if target == "process":
        return start_simulator(log_dir, uds=uds, wait=wait, load_s=2)
    require_real_vllm()
    return start_real_vllm(log_dir, "std", uds=uds, wait=wait)


def _logs(proc: Any) -> str:
    return str(proc.logs() if hasattr(proc, "logs") else proc.output())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class Served:
    """An engine on its socket, and what was seen on the way: the start over a stale socket file
    (its exit code and log), then the start after the file was removed."""

    def __init__(self, proc: Any, refused_while_loading: bool, stale: tuple[int | None, str]):
        self.proc = proc
        self.path = Path(proc.uds)
        self.refused_while_loading = refused_while_loading
        self.stale_exit, self.stale_log = stale


def _over_a_stale_socket(target: str, log_dir: Path, path: Path) -> tuple[int | None, str]:
    """Start on `path` while a socket file left by an engine that is gone is there."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as gone:
        gone.bind(str(path))  # bound, closed: the file stays, nothing answers
    proc = _start(target, log_dir, uds=str(path), wait=False)
    try:
        code = proc.wait_exit(600)
        return code, _logs(proc)
    finally:
        proc.stop()


@pytest.fixture(scope="module", params=TARGETS)
def served(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Served]:
    """Per target, the appliance's sequence on one path, one engine at a time (a real start
    holds one of the machine's real-engine slots): a start over a stale socket file fails; the
    file removed, the next start is watched from its beginning (the socket file appears,
    connections are refused, then /health answers 200) and serves the module's tests."""
    target = str(request.param)
    log_dir = tmp_path_factory.mktemp(f"uds-{target}")
    folder = Path(tempfile.mkdtemp(prefix="uds-"))  # 0700, short (107 bytes at most)
    path = folder / endpoint.SOCKET_NAME
    proc = None
    try:
        stale = _over_a_stale_socket(target, log_dir, path)
        assert path.is_socket()  # the failed start left the file as it was
        path.unlink()  # what the appliance does (endpoint.remove_socket) before a start
        proc = _start(target, log_dir, uds=str(path), wait=False)
        refused = False
        deadline = time.monotonic() + 600
        while proc.health() != 200:
            if proc.returncode is not None:
                pytest.fail(f"{target} exited {proc.returncode}:\n{_logs(proc)[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"{target} not ready on {path}:\n{_logs(proc)[-3000:]}")
            if path.is_socket() and not endpoint.socket_answers(path):
                refused = True
            time.sleep(0.05)
        yield Served(proc, refused, stale)
    finally:
        if proc is not None:
            proc.stop()
        shutil.rmtree(folder, ignore_errors=True)


def test_bound_at_once_refused_while_loading(served: Served) -> None:
    assert served.refused_while_loading, "the socket never refused a connection while loading"
    assert endpoint.socket_answers(served.path)


def test_serves_health_models_and_chat_on_the_socket_only(served: Served) -> None:
    url = served.proc.url
    assert url == endpoint.socket_url(served.path)
    assert endpoint.request("GET", f"{url}/health", 10.0).status_code == 200
    models = endpoint.request("GET", f"{url}/v1/models", 10.0).json()
    assert [m["id"] for m in models["data"]] == [SERVED]
    client = openai.OpenAI(**endpoint.openai_kwargs(url), api_key="EMPTY", max_retries=0)
    reply = client.chat.completions.create(
        model=SERVED,
        messages=[{"role": "user", "content": "What is the answer?"}],
        max_tokens=64,
        extra_body={"reasoning_effort": "low"},
        timeout=120,
    )
    assert reply.choices[0].message.content
    assert reply.usage is not None
    assert reply.usage.completion_tokens > 0
    # --host 127.0.0.1 --port N were passed too: ignored, nothing listens there
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", served.proc.port)) != 0


def test_start_log_names_the_socket(served: Served) -> None:
    assert f"Starting vLLM server on unix:{served.path}" in _logs(served.proc)


def test_socket_mode_is_what_the_umask_leaves(served: Served) -> None:
    info = served.path.stat()
    assert stat.S_ISSOCK(info.st_mode)
    assert stat.S_IMODE(info.st_mode) == 0o777 & ~_umask()  # no chmod after the bind
    assert info.st_uid == os.getuid()


def test_a_file_already_at_the_path_fails_the_start(served: Served) -> None:
    """A socket file left by an engine that is gone: bind() fails and the engine exits 1 (vLLM
    does not unlink it; the appliance removes a stale one before it starts the engine)."""
    assert served.stale_exit == 1, served.stale_log[-3000:]
    assert "Address already in use" in served.stale_log, served.stale_log[-3000:]
    # the appliance reads it as its own failure kind (the hint names the address)
    tracker = PhaseTracker()
    tracker.begin(0.0)
    for i, line in enumerate(served.stale_log.splitlines()):
        tracker.feed(line, float(i))
    assert tracker.failure == phases.ADDRESS_IN_USE, tracker.failure_line
