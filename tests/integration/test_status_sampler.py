"""`step-station status` and the sampler against a real engine container (the simulator image on
the real Docker engine): the same numbers as the dashboard, and the engine's host PIDs from
`docker top` (what NVML lists on a GPU machine)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from fixtures.sim import free_port
from openai import OpenAI

from appliance import endpoint
from appliance import settings as st
from appliance.engine import Supervisor
from appliance.engine.docker_runtime import DockerRuntime
from appliance.engine.spec import LABEL_NAME
from appliance.monitoring.sampler import build_sampler, engine_pid_lookup

pytestmark = [pytest.mark.docker, pytest.mark.timeout(300)]

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def engine_settings(docker_client, sim_image_ref, tmp_path, monkeypatch):
    model = tmp_path / "Step-3.7-Flash-FP8"
    model.mkdir()
    s = st.with_changes(
        st.Settings(),
        {
            "engine.container_name": f"ss-test-status-{uuid.uuid4().hex[:8]}",
            "engine.port": free_port(),
            "engine.image": sim_image_ref,
            "engine.profile": "fp8-tp1",
            "engine.request_gpu": False,
            "engine.model_override": str(model),
            "engine.hf_cache_dir": str(tmp_path / "hf"),
            "engine.start_timeout_s": 120,
            "engine.stop_timeout_s": 10,
        },
    )
    st.save_settings(s)
    monkeypatch.setenv("STEP_SIM_LOAD_S", "1")
    monkeypatch.setenv("STEP_SIM_TOKENS_PER_S", "2000")
    yield s
    for container in docker_client.containers.list(
        all=True, filters={"label": f"{LABEL_NAME}={s.engine.container_name}"}
    ):
        container.remove(force=True)


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "appliance", *args],
        cwd=REPO,
        env=dict(os.environ),
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )


def test_status_shows_host_and_engine_numbers(engine_settings, docker_client):
    started = cli("start")
    assert started.returncode == 0, started.stderr

    # the engine's per-start key, from the appliance's private key file (engine_key.py)
    (key_file,) = (st.data_dir() / "engine-keys").glob("*/*/engine-key")
    # the engine listens on its private socket (appliance/endpoint.py)
    client = OpenAI(
        **endpoint.openai_kwargs(endpoint.engine_url(engine_settings.engine)),
        api_key=key_file.read_text().strip(),
    )
    client.chat.completions.create(
        model="step3p7-flash",
        messages=[{"role": "user", "content": "hello"}],
        max_tokens=30,
        extra_body={"reasoning_effort": "low"},
    )

    text = cli("status")
    assert text.returncode == 0, text.stderr
    assert "Host: CPU " in text.stdout
    assert re.search(r"memory [\d.]+ [KMG]iB of [\d.]+ GiB", text.stdout)
    assert "free disk for weights" in text.stdout
    engine_line = next(
        line for line in text.stdout.splitlines() if line.startswith("Engine metrics: ")
    )
    assert "0 running, 0 waiting" in engine_line
    assert re.search(r"TTFT median \d+ ms", engine_line)  # one request answered: a real median

    as_json = cli("status", "--json")
    assert as_json.returncode == 0, as_json.stderr
    data = json.loads(as_json.stdout)
    assert data["state"] == "ready"
    assert set(data["host"]) == {
        "cpu_pct",
        "memory_total_bytes",
        "memory_used_bytes",
        "weights_disk_free_bytes",
    }
    assert data["host"]["memory_total_bytes"] > data["host"]["memory_used_bytes"] > 0
    assert 0 <= data["host"]["cpu_pct"] <= 100
    # The weights live in the HF cache set in the settings (its file system's free space).
    assert data["host"]["weights_disk_free_bytes"] > 0
    assert isinstance(data["gpus"], list)  # empty on a machine without NVIDIA GPUs
    assert "warnings" not in data

    assert cli("stop").returncode == 0


def test_engine_pids_come_from_docker_top(engine_settings, docker_client):
    sup = Supervisor(engine_settings, download_weights=False)
    try:
        sup.start()
        status = sup.wait_ready(120)
        container = docker_client.containers.get(status.container_id)
        main_pid = int(container.attrs["State"]["Pid"])
        pids = engine_pid_lookup(sup)()
        assert main_pid in pids  # the container's init process, as a host PID
        assert pids == DockerRuntime().engine_pids(status.container_id)
        # The sampler sees the engine ready and scrapes its metrics.
        sample = build_sampler(engine_settings, sup).sample_once()
        assert sample.engine_state == "ready"
        assert sample.engine is not None
        assert sample.engine.sleep_state == "awake"
    finally:
        sup.stop()
        sup.close()
    assert DockerRuntime().engine_pids(status.container_id) == set()
