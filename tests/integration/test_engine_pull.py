"""Pulling the engine image through the real Docker engine from a private registry on a free
port (the shared registry on 5000 is never stopped): byte progress to 100% equal to the image's
layer sizes, registry down before and mid-pull, retry, and the CLI's plain-line progress."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import tarfile
import urllib.request
import uuid
from pathlib import Path

import docker
import pytest
from engine_net import Proxy, Registry, free_port

from appliance import settings as st
from appliance.engine import EngineState, Supervisor
from appliance.engine.docker_runtime import DockerRuntime
from appliance.engine.spec import LaunchSpec
from appliance.errors import ImagePullError
from appliance.units import fmt_progress

pytestmark = [pytest.mark.docker, pytest.mark.timeout(300)]


def _context(sizes: tuple[int, ...]) -> io.BytesIO:
    """A build context for a FROM-scratch image whose layers are random bytes (never shared)."""
    files = {f"l{i}": os.urandom(n) for i, n in enumerate(sizes)}
    dockerfile = "FROM scratch\n" + "".join(f"COPY {name} /{name}\n" for name in files)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in {"Dockerfile": dockerfile.encode(), **files}.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    buf.seek(0)
    return buf


@pytest.fixture(scope="module")
def dk(docker_client):
    return docker_client


@pytest.fixture(scope="module")
def registry(dk, tmp_path_factory):
    reg = Registry(tmp_path_factory.mktemp("registry")).start()
    yield reg
    reg.stop()


@pytest.fixture(scope="module")
def pushed(dk, registry) -> tuple[str, int]:
    """(repository path on the registry, compressed layer bytes from its manifest)."""
    path = f"step-test/pull-{uuid.uuid4().hex[:8]}"
    local = f"{registry.address}/{path}:v1"
    dk.images.build(fileobj=_context((24_000_000, 16_000_000)), custom_context=True, tag=local)
    for event in dk.api.push(f"{registry.address}/{path}", tag="v1", stream=True, decode=True):
        assert "error" not in event, event
    dk.images.remove(local, force=True)  # now only the registry has these layers
    request = urllib.request.Request(
        f"http://{registry.address}/v2/{path}/manifests/v1",
        headers={"Accept": "application/vnd.docker.distribution.manifest.v2+json"},
    )
    with urllib.request.urlopen(request) as response:
        manifest = json.load(response)
    return path, sum(layer["size"] for layer in manifest["layers"])


def _spec(ref: str) -> LaunchSpec:
    return LaunchSpec(name="x", image=ref, args=(), profile="", served_model_name="", host_port=0)


def _forget(dk, ref: str) -> None:
    with contextlib.suppress(docker.errors.ImageNotFound):
        dk.images.remove(ref, force=True)


def test_pull_progress_reaches_the_image_size(dk, registry, pushed) -> None:
    path, layer_bytes = pushed
    ref = f"localhost:{registry.port}/{path}:v1"
    runtime = DockerRuntime()
    seen: list[tuple[int, int, str]] = []
    try:
        assert not runtime.image_present(_spec(ref))
        runtime.ensure_image(_spec(ref), lambda d, t, line: seen.append((d, t, line)))
        assert runtime.image_present(_spec(ref))
        assert seen[-1][:2] == (layer_bytes, layer_bytes)
        assert seen[-1][2] == "2/2 layers, pulled"
        assert any(0 < d < layer_bytes for d, t, _ in seen if t == layer_bytes)
        done = [d for d, _, _ in seen]
        assert done == sorted(done)
    finally:
        _forget(dk, ref)


def test_registry_down_before_the_pull(dk, pushed) -> None:
    path, _ = pushed
    ref = f"localhost:{free_port()}/{path}:v1"  # nothing listens there
    runtime = DockerRuntime()
    with pytest.raises(ImagePullError, match="registry cannot be reached") as info:
        runtime.ensure_image(_spec(ref), lambda d, t, line: None)
    assert "connection refused" in str(info.value)
    assert not runtime.image_present(_spec(ref))


def test_registry_down_mid_pull_then_a_retry_succeeds(dk, registry, pushed) -> None:
    path, layer_bytes = pushed
    proxy = Proxy(("127.0.0.1", registry.port), bytes_per_s=8_000_000).start()
    ref = f"localhost:{proxy.port}/{path}:v1"
    runtime = DockerRuntime(pull_stall_s=5)
    cut_at: list[int] = []

    def cut_midway(done: int, total: int, line: str) -> None:
        if done > 8_000_000 and not cut_at:
            cut_at.append(done)
            proxy.cut()

    try:
        with pytest.raises(ImagePullError, match="made no progress for 5 s") as info:
            runtime.ensure_image(_spec(ref), cut_midway)
        assert "layers already fetched are kept" in str(info.value)
        assert cut_at
        assert not runtime.image_present(_spec(ref))  # nothing half-registered
        proxy.bytes_per_s = 0
        proxy.resume()
        seen: list[tuple[int, int]] = []
        again = DockerRuntime()  # `step-station pull` once more, with the default stall deadline
        again.ensure_image(_spec(ref), lambda d, t, line: seen.append((d, t)))
        assert again.image_present(_spec(ref))
        # what was fetched before the cut is not fetched again: this pull's total is the rest
        assert seen[-1][0] == seen[-1][1]
        assert 0 < seen[-1][1] <= layer_bytes
    finally:
        proxy.close()
        _forget(dk, ref)


def test_cli_pull_prints_plain_progress_lines(dk, registry, pushed, station_home: Path) -> None:
    path, layer_bytes = pushed
    ref = f"localhost:{registry.port}/{path}:v1"
    settings = st.with_changes(st.Settings(), {"engine.image": ref})
    st.save_settings(settings)
    try:
        done = subprocess.run(
            [sys.executable, "-m", "appliance", "pull"], capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, done.stderr
        lines = done.stdout.splitlines()
        whole = fmt_progress(layer_bytes, layer_bytes)  # "12.3 of 12.3 MiB (100%)"
        assert any(line.endswith(f": {whole}") for line in lines), lines
        assert lines[-1].startswith(f"Pulled {ref}")
        assert "\r" not in done.stdout  # not a terminal: no redrawn bar
    finally:
        _forget(dk, ref)


def test_start_pulls_a_missing_image_first(dk, registry, sim_image_ref, monkeypatch) -> None:
    """The simulator image, re-tagged on the private registry and absent under that name."""
    ref = f"localhost:{registry.port}/step-test/engine-{uuid.uuid4().hex[:8]}:stepfun37"
    dk.images.get(sim_image_ref).tag(ref)
    for event in dk.api.push(ref.rsplit(":", 1)[0], tag="stepfun37", stream=True, decode=True):
        assert "error" not in event, event
    dk.images.remove(ref)
    settings = st.with_changes(
        st.Settings(),
        {
            "engine.image": ref,
            "engine.container_name": f"sst-{uuid.uuid4().hex[:10]}",
            "engine.port": free_port(),
            "engine.profile": "fp8-tp1",
            "engine.request_gpu": False,
        },
    )
    monkeypatch.setenv("STEP_SIM_LOAD_S", "1")
    sup = Supervisor(settings, download_weights=False, poll_interval_s=0.1, outside_poll_s=0)
    states: list[EngineState] = []
    sup.add_listener(lambda s: states.append(s.state))
    try:
        sup.start()
        status = sup.wait_ready(120)
        assert EngineState.PULLING_IMAGE in states
        assert states.index(EngineState.PULLING_IMAGE) < states.index(EngineState.READY)
        assert status.phases[0].name == "Pulling image"
        assert status.phases[0].done
    finally:
        sup.stop()
        sup.close()
        _forget(dk, ref)
