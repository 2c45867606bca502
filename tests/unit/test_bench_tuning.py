"""A tuning run end to end, with vLLM's tuner replaced at the one seam that needs a GPU.

The fake tuner (tests/fixtures/tune_kit.py) does what vLLM's `benchmark_moe.py --tune` does as
seen from outside, writing entries copied from a config vLLM 0.32 ships (its real format)."""

from __future__ import annotations

import dataclasses
import json
import threading
from pathlib import Path
from typing import Any

import pytest
from fixtures.tune_kit import STEP37_FILE, TARGET, UUID, VLLM_ENTRIES, FakeTuner

from appliance import moe_folder
from appliance.bench import tune
from appliance.bench.errors import BenchError, TunedConfigError
from appliance.bench.tuning import (
    CONTAINER_MODEL_DIR,
    CONTAINER_SAVE_DIR,
    TuneRequest,
    TunerJob,
    TuneRunner,
    TuneState,
    container_request,
    estimate_text,
    last_install,
)


def _runner(tmp_path: Path, tuner: FakeTuner, **kwargs: Any) -> TuneRunner:
    return TuneRunner(
        launcher_for=lambda target: tuner,
        folder=tmp_path / "moe-configs",
        work_root=tmp_path / "work",
        **kwargs,
    )


def test_tuning_stops_the_engine_runs_the_tuner_in_chunks_and_installs_vllms_file(
    tmp_path: Path,
) -> None:
    tuner = FakeTuner()
    events: list[str] = []
    tuner.events = events
    runner = _runner(tmp_path, tuner)
    seen: list[TuneState] = []
    messages: list[str] = []

    def stop(message: str) -> None:
        events.append("stop")
        messages.append(message)

    request = TuneRequest(batch_sizes=(64, 1, 2, 4, 8), chunk_size=3)
    outcome = runner.run(request, TARGET, stop, seen.append)

    assert events[0] == "stop"  # before any tuner touches the GPU
    assert "engine is stopped while tuning" in messages[0]
    assert "5 batch sizes" in messages[0]
    assert "not a measurement" in messages[0]
    # two tuner runs: sorted batch sizes in chunks of three
    assert [job.batch_sizes for job in tuner.jobs] == [(1, 2, 4), (8, 64)]
    argv = list(tuner.jobs[0].argv)
    assert argv[:2] == ["python3", "benchmarks/kernels/benchmark_moe.py"]
    assert argv[argv.index("--model") + 1] == CONTAINER_MODEL_DIR
    assert argv[argv.index("--save-dir") + 1] == CONTAINER_SAVE_DIR
    assert argv[argv.index("--tp-size") + 1] == "1"
    assert argv[argv.index("--dtype") + 1] == "fp8_w8a8"
    assert "--tune" in argv
    # the synthetic model the tuner read carries Step-3.7's expert shape
    config = tuner.processes[0].config
    assert config["architectures"] == ["Qwen3MoeForCausalLM"]
    assert (config["num_experts"], config["num_experts_per_tok"]) == (288, 8)
    assert (config["moe_intermediate_size"], config["hidden_size"]) == (1280, 4096)
    assert config["quantization_config"]["weight_block_size"] == [128, 128]
    assert all(p.cleaned for p in tuner.processes)

    # installed under vLLM's own name, in vLLM's format, every batch size merged
    assert outcome.completed
    assert outcome.file_name == STEP37_FILE
    installed = tmp_path / "moe-configs" / STEP37_FILE
    loaded = tune.load_config(installed)
    assert sorted(loaded) == [1, 2, 4, 8, 64]
    assert loaded[64] == VLLM_ENTRIES["64"]
    assert json.loads(installed.read_text())["triton_version"] == "3.5.0"
    status = tune.find_config(tmp_path / "moe-configs", _shape(), "NVIDIA GB300")
    assert status.usable
    # no temporary file left beside it for an engine start to trip on
    names = sorted(p.name for p in (tmp_path / "moe-configs").iterdir())
    assert names == [STEP37_FILE, "installs.jsonl"]
    record = last_install(tmp_path / "moe-configs", STEP37_FILE)
    assert record is not None
    assert record.image_digest == TARGET.image_digest
    assert record.batch_sizes == (1, 2, 4, 8, 64)
    # ... and the next start mounts it
    tuning = moe_folder.tuning_for_start(tmp_path / "moe-configs")
    assert tuning is not None
    assert tuning.env == {"VLLM_TUNED_CONFIG_FOLDER": "/opt/step-station/moe-configs"}

    # progress: batch sizes done out of the total, a rate-based remaining time once one is done
    assert [s.done for s in seen if s.done][-1] == 5
    assert all(s.total == 5 for s in seen)
    assert any(s.remaining_s is not None for s in seen)
    assert {s.chunk for s in seen} >= {1, 2}
    assert runner.current() is None  # released
    assert not list((tmp_path / "work").iterdir())  # work folder removed


def _shape() -> tune.MoeShape:
    return tune.MoeShape(288, 1280, "fp8_w8a8", (128, 128))


def test_a_running_benchmark_refuses_tuning_before_the_engine_stops(tmp_path: Path) -> None:
    def busy() -> None:
        raise BenchError("A benchmark (seed) is already running.")

    tuner = FakeTuner()
    runner = _runner(tmp_path, tuner, ensure_bench_idle=busy)
    stopped: list[str] = []
    with pytest.raises(BenchError, match="already running"):
        runner.run(TuneRequest(batch_sizes=(1,)), TARGET, stopped.append)
    assert stopped == []
    assert tuner.jobs == []


def test_nvfp4_is_refused_with_the_reason_before_anything_stops(tmp_path: Path) -> None:
    tuner = FakeTuner()
    stopped: list[str] = []
    with pytest.raises(TunedConfigError, match="NVFP4 cannot be tuned"):
        _runner(tmp_path, tuner).run(TuneRequest(dtype="nvfp4"), TARGET, stopped.append)
    assert stopped == []
    assert tuner.jobs == []


def test_one_tuning_at_a_time(tmp_path: Path) -> None:
    tuner = FakeTuner(hold=True)
    runner = _runner(tmp_path, tuner)
    started = threading.Event()
    thread = threading.Thread(
        target=runner.run,
        args=(TuneRequest(batch_sizes=(1, 2)), TARGET, lambda m: None, lambda s: started.set()),
    )
    thread.start()
    assert started.wait(10)
    with pytest.raises(BenchError, match="already running"):
        runner.ensure_idle()
    with pytest.raises(BenchError, match="already running"):
        runner.run(TuneRequest(batch_sizes=(1,)), TARGET, lambda m: None)
    assert runner.cancel()
    thread.join(10)
    assert not thread.is_alive()


def test_cancel_stops_the_tuner_and_installs_nothing(tmp_path: Path) -> None:
    tuner = FakeTuner(hold=True)
    runner = _runner(tmp_path, tuner)

    def progress(state: TuneState) -> None:
        if state.done == 1:
            runner.cancel()

    outcome = runner.run(
        TuneRequest(batch_sizes=(1, 2, 4, 8), chunk_size=2), TARGET, lambda m: None, progress
    )
    assert outcome.state == "cancelled"
    assert tuner.processes[0].terminated.is_set()
    assert len(tuner.jobs) == 1  # the second chunk never started
    assert not (tmp_path / "moe-configs").exists()
    assert not runner.cancel()  # nothing runs any more


def test_a_failed_tuner_says_why_and_installs_nothing(tmp_path: Path) -> None:
    tuner = FakeTuner(code=1)
    with pytest.raises(BenchError, match=r"exited with code 1.*ray is not installed") as err:
        _runner(tmp_path, tuner).run(TuneRequest(batch_sizes=(1,)), TARGET, lambda m: None)
    assert "The engine stays stopped" in err.value.hint
    assert not (tmp_path / "moe-configs").exists()


@pytest.mark.parametrize(
    ("write", "error"),
    [
        ({"content": {"triton_version": "3.5.0", "1": {"BLOCK_SIZE_M": 16}}}, "format"),
        ({"name": "E=288,N=11264,device_name=NVIDIA_GB300,dtype=fp8_w8a8.json"}, "not the file"),
    ],
)
def test_a_wrong_output_is_refused_and_the_installed_file_stays(
    tmp_path: Path, write: dict[str, Any], error: str
) -> None:
    folder = tmp_path / "moe-configs"
    folder.mkdir()
    before = json.dumps({"triton_version": "3.5.0", "4096": VLLM_ENTRIES["4096"]})
    (folder / STEP37_FILE).write_text(before)
    with pytest.raises(TunedConfigError, match=error):
        _runner(tmp_path, FakeTuner(**write)).run(
            TuneRequest(batch_sizes=(1,)), TARGET, lambda m: None
        )
    assert (folder / STEP37_FILE).read_text() == before


def test_batch_sizes_tuned_earlier_under_the_same_triton_are_kept(tmp_path: Path) -> None:
    folder = tmp_path / "moe-configs"
    folder.mkdir()
    (folder / STEP37_FILE).write_text(
        json.dumps({"triton_version": "3.5.0", "4096": VLLM_ENTRIES["4096"]})
    )
    outcome = _runner(tmp_path, FakeTuner()).run(
        TuneRequest(batch_sizes=(1, 2)), TARGET, lambda m: None
    )
    assert sorted(tune.load_config(folder / STEP37_FILE)) == [1, 2, 4096]
    assert "kept" in outcome.note
    # another Triton (a new image): the old entries go
    outcome = _runner(tmp_path, FakeTuner(triton="3.6.0")).run(
        TuneRequest(batch_sizes=(8,)), TARGET, lambda m: None
    )
    assert sorted(tune.load_config(folder / STEP37_FILE)) == [8]


def test_the_tuner_container_runs_the_engine_image_on_the_engines_gpu(tmp_path: Path) -> None:
    job = TunerJob(
        argv=("python3", "benchmarks/kernels/benchmark_moe.py", "--tune"),
        model_dir=tmp_path / "model",
        save_dir=tmp_path / "out-1",
        stamp="20261206-030000-1",
        batch_sizes=(1,),
    )
    request = container_request(TARGET, job)
    assert request["image"] == TARGET.image_digest
    assert request["entrypoint"] == ["python3"]
    assert request["command"] == ["benchmarks/kernels/benchmark_moe.py", "--tune"]
    assert request["working_dir"] == "/vllm-workspace"
    assert request["device_requests"] == [{"capabilities": [["gpu"]], "device_ids": [UUID]}]
    assert request["volumes"] == {
        str(tmp_path / "model"): {"bind": CONTAINER_MODEL_DIR, "mode": "ro"},
        str(tmp_path / "out-1"): {"bind": CONTAINER_SAVE_DIR, "mode": "rw"},
    }
    assert request["labels"] == {"io.step-station.tune": "20261206-030000-1"}
    assert request["network_mode"] == "none"
    assert request["environment"]["PYTHONUNBUFFERED"] == "1"  # its progress lines as they come
    # no GPU asked where the engine asks none (`engine.request_gpu` off: Docker without NVIDIA)
    no_gpu = container_request(dataclasses.replace(TARGET, request_gpu=False), job)
    assert "device_requests" not in no_gpu
    # all GPUs where no UUID is known, as the engine's own spec does
    assert container_request(dataclasses.replace(TARGET, gpu_uuid=""), job)["device_requests"] == [
        {"capabilities": [["gpu"]], "count": -1}
    ]


def test_the_estimate_scales_with_batch_sizes_and_says_it_is_one() -> None:
    assert "1.0 h-3.0 h" in estimate_text(18, "NVIDIA GB300")
    assert "NVIDIA GB300" in estimate_text(18, "NVIDIA GB300")
    assert "10 min-30 min" in estimate_text(3, "")
    assert "not a measurement" in estimate_text(3, "")
