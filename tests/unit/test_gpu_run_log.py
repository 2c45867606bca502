"""The appliance's phase parser over real vLLM 0.23.0 logs from an NVIDIA H200 (issue 18).

The logs in docs/runs/ are complete, unedited `vllm serve` outputs captured on the GPU device
machine by scripts/gpu_vllm.sh (see docs/runs/h200-vllm-0.23-notes.md): the tiny standard model
and the tiny Step-3.7 model (dummy weights) with the Station flags, and one start that failed
inside the engine core. They are read the way the runtimes hand lines to the supervisor
(`split_lines`: tqdm bars arrive `\\r`-separated).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance.engine import phases
from appliance.engine.phases import PhaseTracker
from appliance.engine.runtime import split_lines

RUNS = Path(__file__).resolve().parents[2] / "docs" / "runs"
STD_LOG = RUNS / "h200-vllm-0.23-run1-std-startup.log"
STEP_LOG = RUNS / "h200-vllm-0.23-run2-step-startup.log"
FAILED_LOG = RUNS / "h200-vllm-0.23-run1-step-startup.log"

# The line that opens each phase in a GPU start of vLLM 0.23.0, in order.
OPENED_BY = [
    (phases.INITIALIZING, "version 0.23.0"),
    (phases.LOADING_WEIGHTS, "Starting to load model"),
    (phases.COMPILING, "for vLLM's torch.compile"),
    (phases.KV_CACHE, "Available KV cache memory"),
    (phases.CUDA_GRAPHS, "Capturing CUDA graphs (mixed prefill-decode, PIECEWISE)"),
    (phases.API_SERVER, "Supported tasks"),
]


def track(path: Path) -> tuple[PhaseTracker, list[tuple[str, str]]]:
    """Feed a whole log; returns the tracker and (phase, the line that opened it)."""
    lines, rest = split_lines(path.read_text(encoding="utf-8"))
    assert rest.strip() == "", f"{path.name} ends mid-line"
    tracker = PhaseTracker()
    tracker.begin(0.0)
    opened: list[tuple[str, str]] = []
    for i, line in enumerate(lines, start=1):
        before = len(tracker.phases)
        tracker.feed(line, float(i))
        if len(tracker.phases) != before:
            opened.append((tracker.phases[-1].name, line))
    return tracker, opened


@pytest.mark.parametrize("path", [STD_LOG, STEP_LOG], ids=["tiny-std", "tiny-step3p7"])
def test_every_phase_of_a_gpu_start_is_classified_in_order(path: Path) -> None:
    tracker, opened = track(path)
    assert [p.name for p in tracker.phases] == list(phases.LOG_PHASES)
    assert [name for name, _ in opened] == [name for name, _ in OPENED_BY]
    for (name, line), (_, marker) in zip(opened, OPENED_BY, strict=True):
        assert marker in line, f"{name} opened by {line!r}"
    # Every phase but the last was closed by the next one, none ran backwards in time.
    assert all(p.done and p.elapsed_s is not None for p in tracker.phases[:-1])
    assert tracker.phases[-1].name == phases.API_SERVER
    # The CUDA-graph phase shows the capture's progress as vLLM's bar last drew it.
    graphs = next(p for p in tracker.phases if p.name == phases.CUDA_GRAPHS)
    assert graphs.detail == "decode, FULL 51/51"
    # A whole run after start-up (requests, sleep and wake, shutdown) reads as no failure.
    assert tracker.failure is None, tracker.failure_line


def test_the_facts_of_the_standard_model_start() -> None:
    facts = track(STD_LOG)[0].facts
    assert facts["vllm_version"] == "0.23.0"
    assert facts["architecture"] == "Qwen2ForCausalLM"
    assert facts["model_max_len"] == 4096
    assert facts["weights_gib"] == 0.0
    assert facts["compile_s"] == 9.52
    # --gpu-memory-utilization 0.95 with an FP8 KV cache on a 141 GB H200.
    assert facts["kv_cache_gib"] == 132.35
    assert facts["kv_cache_tokens"] == 277_549_184
    assert facts["max_model_len"] == 4096
    assert facts["max_concurrency"] == 67761.03
    assert facts["graph_capture_s"] == 1.0
    assert facts["server_url"].startswith("http://127.0.0.1:")


def test_the_facts_of_the_step3p7_start() -> None:
    facts = track(STEP_LOG)[0].facts
    assert facts["vllm_version"] == "0.23.0"
    assert facts["architecture"] == "Step3p7ForConditionalGeneration"
    assert facts["kv_cache_gib"] == 132.06
    assert facts["kv_cache_tokens"] == 276_416_891
    assert facts["graph_capture_s"] == 7.0


def test_an_engine_core_that_fails_while_building_the_model() -> None:
    # A model config vLLM 0.23's step3p5.py could not read (`'Step3p7TextConfig' object has no
    # attribute 'swiglu_limits_shared'`): the engine core dies while loading weights.
    tracker, _ = track(FAILED_LOG)
    assert [p.name for p in tracker.phases] == list(phases.LOG_PHASES[:3])
    assert tracker.current is not None
    assert tracker.current.name == phases.LOADING_WEIGHTS
    assert tracker.failure == phases.ENGINE_INIT_FAILED
    assert "EngineCore failed to start" in tracker.failure_line
