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
    """An engine on its socket, and what was seen while it started."""

    def __init__(self, proc: Any, refused_while_loading: bool) -> None:
        self.proc = proc
        self.path = Path(proc.uds)
        self.refused_while_loading = refused_while_loading


@pytest.fixture(scope="module", params=TARGETS)
def served(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Served]:
    """One engine per target for the module, watched from its start: the socket file appears,
    connections are refused, then /health answers 200."""
    target = str(request.param)
    proc = _start(target, tmp_path_factory.mktemp(f"uds-{target}"), wait=False)
    path = Path(proc.uds)
    refused = False
    deadline = time.monotonic() + 600
    try:
        while proc.health() != 200:
            if proc.returncode is not None:
                pytest.fail(f"{target} exited {proc.returncode}:\n{_logs(proc)[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"{target} not ready on {path}:\n{_logs(proc)[-3000:]}")
            if path.is_socket() and not endpoint.socket_answers(path):
                refused = True
            time.sleep(0.05)
        yield Served(proc, refused)
    finally:
        proc.stop()
        if getattr(proc, "made_dir", ""):  # the simulator's; the real engine's stop removes its own
            shutil.rmtree(proc.made_dir, ignore_errors=True)


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


@pytest.mark.parametrize("target", TARGETS)
def test_a_file_already_at_the_path_fails_the_start(target: str, tmp_path: Path) -> None:
    """A socket file left by an engine that is gone: bind() fails, the engine exits 1 (vLLM does
    not unlink it; the appliance removes a stale one before it starts the engine)."""
    folder = Path(tempfile.mkdtemp(prefix="uds-stale-"))
    try:
        path = folder / endpoint.SOCKET_NAME
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as gone:
            gone.bind(str(path))  # bound, closed: the file stays, nothing answers
        assert path.is_socket()
        proc = _start(target, tmp_path, uds=str(path), wait=False)
        try:
            code = proc.wait_exit(600)
            logs = _logs(proc)
        finally:
            proc.stop()
        assert code == 1, logs[-3000:]
        assert "Address already in use" in logs, logs[-3000:]
        assert path.is_socket()  # left as it was
        # the appliance reads it as its own failure kind (the hint names the address)
        tracker = PhaseTracker()
        tracker.begin(0.0)
        for i, line in enumerate(logs.splitlines()):
            tracker.feed(line, float(i))
        assert tracker.failure == phases.ADDRESS_IN_USE, tracker.failure_line
    finally:
        for leftover in folder.iterdir():
            leftover.unlink()
        folder.rmdir()
