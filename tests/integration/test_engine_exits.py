"""An engine that ended without our stop is a crash, whatever its exit code.

vLLM's API server exits 0 when its engine core dies (vLLM issue 48966), so "exit code 0" says
nothing about whether the engine was meant to stop. Our own stop removes the engine (container,
pid file): one that still exists, exited, ended by itself. Seen before this fix: a crashed engine
adopted at start-up showed as `stopped`, "The engine is stopped.".
"""

from __future__ import annotations

import os
import signal
import uuid

import psutil
import pytest
from fixtures.sim import free_port

from appliance import settings as st
from appliance.engine import EngineState, Supervisor
from appliance.engine.spec import LABEL_NAME

pytestmark = pytest.mark.timeout(180)


def test_an_engine_process_that_ended_unwatched_is_reported_as_a_crash(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("STEP_SIM_LOAD_S", "1")
    port = free_port()
    settings = st.with_changes(
        st.Settings(),
        {
            "engine.port": port,
            "engine.profile": "fp8-tp1",
            "engine.container_name": f"gone-{os.getpid()}-{port}",
        },
    )
    first = Supervisor.for_demo(settings, poll_interval_s=0.1, outside_poll_s=0)
    first.start()
    status = first.wait_ready(60)
    first.close()  # the appliance goes away; the engine keeps running, as a container would
    engine = psutil.Process(int(status.container_id.split(":", 1)[1]))
    os.killpg(engine.pid, signal.SIGTERM)  # it ends on its own (a clean exit code, even)
    psutil.wait_procs([engine], timeout=30)

    second = Supervisor.for_demo(settings, poll_interval_s=0.1, outside_poll_s=0)
    try:
        found = second.attach()
        assert found.state == EngineState.FAILED, found
        assert "crashed while no step-station watched it" in found.message
        assert found.log_tail  # the engine's last lines come with it
        assert second.stop().state == EngineState.STOPPED  # and it can be cleaned up
        assert second.runtime.find(settings.engine.container_name) is None
    finally:
        second.close()


@pytest.mark.docker
def test_an_exited_container_with_code_0_is_a_crash_at_adoption(
    docker_client, sim_image_ref: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The issue's case with the appliance's own Docker runtime: the engine container exited 0
    while no appliance watched; adoption says crashed (exit code 0), with the log tail."""
    monkeypatch.setenv("STEP_SIM_LOAD_S", "1")
    settings = st.with_changes(
        st.Settings(),
        {
            "engine.container_name": f"sst-exit-{uuid.uuid4().hex[:10]}",
            "engine.port": free_port(),
            "engine.image": sim_image_ref,
            "engine.profile": "fp8-tp1",
            "engine.request_gpu": False,
            "engine.start_timeout_s": 90,
            "engine.stop_timeout_s": 10,
        },
    )
    first = Supervisor(settings, download_weights=False, poll_interval_s=0.1, outside_poll_s=0)
    second = None
    try:
        first.start()
        first.wait_ready(120)
        first.close()
        (container,) = docker_client.containers.list(
            all=True, filters={"label": f"{LABEL_NAME}={settings.engine.container_name}"}
        )
        container.stop(timeout=10)  # SIGTERM: the engine exits by itself, code 0
        container.reload()
        assert container.attrs["State"]["ExitCode"] == 0
        second = Supervisor(settings, download_weights=False, poll_interval_s=0.1, outside_poll_s=0)
        found = second.attach()
        assert found.state == EngineState.FAILED, found
        assert found.exit_code == 0
        assert "crashed while no step-station watched it (exit code 0)" in found.message
        assert found.log_tail
    finally:
        for sup in (first, second):
            if sup is not None:
                sup.close()
        for container in docker_client.containers.list(
            all=True, filters={"label": f"{LABEL_NAME}={settings.engine.container_name}"}
        ):
            container.remove(force=True)
