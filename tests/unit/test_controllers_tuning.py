"""The Model tab's tuned-kernels line (read as vLLM reads the folder) and the before/after pair
of benchmark runs (the real store, vLLM 0.32's own result file, a clock the test moves)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from appliance.bench import tune
from appliance.bench.store import BenchStore, RunInfo
from appliance.bench.tuning import InstallRecord, TuneTarget, record_install
from appliance.controllers.tuning import before_after, tuned_view, tuned_view_for

DATA = Path(__file__).resolve().parents[1] / "data"
REAL_RESULT = json.loads((DATA / "bench" / "result-0.32-spec-decode.json").read_text())
B200 = "E=128,N=384,device_name=NVIDIA_B200,dtype=fp8_w8a8,block_shape=[128,128].json"
B200_SHAPE = tune.MoeShape(128, 384, "fp8_w8a8", (128, 128))
DIGEST = "sha256:" + "c" * 64


def _folder(tmp_path: Path, *, digest: str | None = DIGEST) -> Path:
    folder = tmp_path / "moe-configs"
    folder.mkdir()
    # a file vLLM 0.32 ships, under its own name and in its own format
    shutil.copy(DATA / "moe_configs" / B200, folder / B200)
    if digest is not None:
        record_install(folder, InstallRecord(B200, 1_700_000_000.0, image_digest=digest))
    return folder


def test_tuned_with_this_image_names_the_file_vllm_loads(tmp_path: Path) -> None:
    view = tuned_view(_folder(tmp_path), B200_SHAPE, "NVIDIA B200", DIGEST)
    assert view.state == "tuned"
    assert view.file_name == B200
    assert f"`{B200}`" in view.text  # vLLM's exact name, unescaped in a code span
    assert "this engine image" in view.text
    assert "18 batch sizes" in view.text
    assert view.installed_at == 1_700_000_000.0
    assert "2023-11-14 22:13 UTC" in view.text


def test_without_the_engines_digest_the_recorded_image_is_named(tmp_path: Path) -> None:
    view = tuned_view(_folder(tmp_path), B200_SHAPE, "NVIDIA B200")
    assert view.state == "tuned"
    assert "with image sha256:cccccccccccc:" in view.text


def test_tuned_with_another_image_says_so(tmp_path: Path) -> None:
    view = tuned_view(_folder(tmp_path), B200_SHAPE, "NVIDIA B200", "sha256:" + "d" * 64)
    assert view.state == "other_image"
    assert "another engine image" in view.text


def test_a_file_copied_by_hand_counts_with_its_own_date(tmp_path: Path) -> None:
    folder = _folder(tmp_path, digest=None)
    view = tuned_view(folder, B200_SHAPE, "NVIDIA B200", DIGEST)
    assert view.state == "tuned"
    assert "an unrecorded image" in view.text
    assert view.installed_at == pytest.approx((folder / B200).stat().st_mtime)


@pytest.mark.parametrize(
    ("shape", "gpu"),
    [
        (B200_SHAPE, "NVIDIA GB300"),  # another GPU: vLLM looks for another name
        (tune.MoeShape(288, 1280, "fp8_w8a8", (128, 128)), "NVIDIA B200"),  # another shape
        (tune.MoeShape(128, 384, None, None), "NVIDIA B200"),  # bf16: no dtype part
    ],
)
def test_a_file_for_another_gpu_or_shape_is_not_tuned(
    tmp_path: Path, shape: tune.MoeShape, gpu: str
) -> None:
    view = tuned_view(_folder(tmp_path), shape, gpu, DIGEST)
    assert view.state == "not_tuned"
    assert view.file_name == tune.config_file_name(shape, gpu)
    assert "tune-moe" in view.text


def test_a_broken_file_is_named_with_its_problem(tmp_path: Path) -> None:
    folder = _folder(tmp_path)
    (folder / B200).write_text(json.dumps({"triton_version": "3.5.0", "best": {}}))
    view = tuned_view(folder, B200_SHAPE, "NVIDIA B200", DIGEST)
    assert view.state == "broken"
    assert "not a batch size" in view.text


def test_unknown_gpu_or_shape_cannot_tell(tmp_path: Path) -> None:
    view = tuned_view(tmp_path, None, "NVIDIA B200", why_unknown="the checkpoint is <not> here")
    assert view.state == "unknown"
    assert "&lt;not&gt;" in view.text


def test_the_view_for_the_engine_reads_the_shape_from_its_checkpoint(tmp_path: Path) -> None:
    text = {"moe_num_experts": 128, "moe_top_k": 8, "moe_intermediate_size": 384}
    target = TuneTarget(
        "image", "GPU-1", "NVIDIA B200", text | {"hidden_size": 4096}, image_digest=DIGEST
    )
    assert tuned_view_for(_folder(tmp_path), target).state == "tuned"
    assert tuned_view_for(tmp_path, None, "the checkpoint is not here").state == "unknown"
    broken = TuneTarget("image", "GPU-1", "NVIDIA B200", {"hidden_size": 4096})
    view = tuned_view_for(tmp_path, broken)
    assert view.state == "unknown"
    assert "no MoE expert count" in view.text


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _add(store: BenchStore, clock: Clock, at: float, **info: Any) -> int:
    clock.now = at
    base: dict[str, Any] = {"profile": "fp8-tp1", "preset": "seed", "gpu_name": "NVIDIA GB300"}
    throughput = REAL_RESULT["output_throughput"] * (1.2 if at > 5000 else 1.0)
    return store.add(RunInfo(**(base | info)), REAL_RESULT | {"output_throughput": throughput})


def test_before_and_after_pairs_the_runs_either_side_of_the_install(tmp_path: Path) -> None:
    clock = Clock()
    with BenchStore(tmp_path / "bench.sqlite3", clock=clock) as store:
        _add(store, clock, 1000.0)
        last_before = _add(store, clock, 2000.0)
        _add(store, clock, 3000.0, preset="chat")  # later, but not comparable with the after run
        first_after = _add(store, clock, 6000.0)
        _add(store, clock, 7000.0)
        runs = store.list_runs()
    pair = before_after(runs, installed_at=5000.0)
    assert pair.before is not None
    assert pair.after is not None
    assert (pair.before.id, pair.after.id) == (last_before, first_after)
    output = next(row for row in pair.rows if row[0] == "Output tokens/s")
    assert output[3] == "+20.0% (better)"
    assert f"Run {last_before} (before tuning) against run {first_after}" in pair.text


def test_no_run_after_or_nothing_comparable_before_says_what_to_do(tmp_path: Path) -> None:
    clock = Clock()
    with BenchStore(tmp_path / "bench.sqlite3", clock=clock) as store:
        _add(store, clock, 1000.0)
        assert before_after(store.list_runs(), installed_at=5000.0).after is None
        assert "run `step-station bench`" in before_after(store.list_runs(), 5000.0).text
        _add(store, clock, 6000.0, flags={"mtp": True})  # MTP on after, off before
        pair = before_after(store.list_runs(), installed_at=5000.0)
    assert pair.after is not None
    assert pair.before is None
    assert pair.rows == []
