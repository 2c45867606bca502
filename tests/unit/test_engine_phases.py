"""vLLM log lines -> phases in order, facts, failures (reference/vllm.md §startup)."""

from __future__ import annotations

from appliance.engine import phases
from appliance.engine.phases import PhaseTracker, parse_line
from appliance.engine.runtime import split_lines

P = "(EngineCore_DP0 pid=42) INFO 11-29 01:02:03 [x.py:1] "
STARTUP = [
    "(APIServer pid=1) INFO 11-29 01:02:03 [api_server.py:1885] vLLM API server version 0.16.0",
    "(APIServer pid=1) INFO 11-29 01:02:03 [model.py:1] Resolved architecture: "
    "Step3p7ForConditionalGeneration",
    "(APIServer pid=1) INFO 11-29 01:02:03 [model.py:1] Using max model len 262144",
    P + "Initializing a V1 LLM engine (v0.16.0) with config: model='x'",
    P + "Starting to load model stepfun-ai/Step-3.7-Flash-FP8...",
    "Loading safetensors checkpoint shards:  42% Completed | 21/50 [00:10<00:12, 2.0it/s]",
    P + "Loading weights took 123.45 seconds",
    P + "Model loading took 198.3 GiB memory and 130.2 seconds",
    P + "torch.compile took 41.2 s in total",
    P + "Available KV cache memory: 18.5 GiB",
    P + "GPU KV cache size: 808,000 tokens",
    P + "Maximum concurrency for 262,144 tokens per request: 3.08x",
    "Capturing CUDA graphs (mixed prefill-decode, PIECEWISE): 100%|██████████| 51/51 [00:05<00:00]",
    P + "Graph capturing finished in 12 secs, took 1.2 GiB",
    P + "init engine (profile, create kv cache, warmup model) took 70.1 seconds",
    "(APIServer pid=1) INFO 11-29 01:02:03 [api_server.py:1] Starting vLLM server on "
    "http://0.0.0.0:8000",
    "(APIServer pid=1) INFO 11-29 01:02:03 [launcher.py:1] Route: /health, Methods: GET",
    "(APIServer pid=1) INFO:     Application startup complete.",
]


def test_startup_lines_give_every_phase_in_order_with_times() -> None:
    tracker = PhaseTracker()
    tracker.begin(0.0)
    for i, line in enumerate(STARTUP, start=1):
        tracker.feed(line, float(i))
    names = [p.name for p in tracker.phases]
    assert names == list(phases.LOG_PHASES)
    # each phase but the last is closed by the next; elapsed = gap between their first lines
    assert all(p.done for p in tracker.phases[:-1])
    assert not tracker.phases[-1].done
    weights = tracker.phases[2]
    assert weights.name == phases.LOADING_WEIGHTS
    assert weights.started_at == 5.0
    assert weights.elapsed_s == 9.0 - 5.0  # until "torch.compile" at line 9
    assert weights.detail == "21/50 shards"
    tracker.close(30.0)
    assert tracker.phases[-1].done
    assert tracker.phases[-1].elapsed_s == 30.0 - 16.0


def test_facts_parsed_from_the_log() -> None:
    tracker = PhaseTracker()
    for line in STARTUP:
        tracker.feed(line, 1.0)
    facts = tracker.facts
    assert facts["vllm_version"] == "0.16.0"
    assert facts["architecture"] == "Step3p7ForConditionalGeneration"
    assert facts["kv_cache_tokens"] == 808_000
    assert facts["max_model_len"] == 262_144
    assert facts["max_concurrency"] == 3.08
    assert facts["kv_cache_gib"] == 18.5
    assert facts["weights_gib"] == 198.3
    assert facts["compile_s"] == 41.2
    assert facts["graph_capture_s"] == 12.0
    assert tracker.failure is None


def test_phases_never_go_backwards() -> None:
    tracker = PhaseTracker()
    tracker.feed(P + "Available KV cache memory: 1 GiB", 1.0)
    tracker.feed(P + "torch.compile took 3.0 s in total", 2.0)  # an earlier phase's line
    assert [p.name for p in tracker.phases] == [phases.KV_CACHE]


def test_failures_are_recognised() -> None:
    oom = "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB."
    assert parse_line(oom) is not None
    cases = {
        oom: phases.CUDA_OOM,
        "ValueError: No available memory for the cache blocks. Try increasing": phases.KV_NO_MEMORY,
        "ValueError: The model's max seq len (262144) is larger than the maximum number of tokens "
        "that can be stored in KV cache (100000).": phases.MAX_LEN_TOO_LARGE,
        "ValueError: To serve at least one request with the models's max seq len (262144), "
        "(12.00 GiB KV cache is needed, which is larger than the available KV cache memory "
        "(5.93 GiB). Based on the available memory, the estimated maximum model length is "
        "129536.": phases.MAX_LEN_TOO_LARGE,
        "RuntimeError: CUDA error: an illegal memory access was encountered": phases.CUDA_ERROR,
    }
    for line, kind in cases.items():
        tracker = PhaseTracker()
        tracker.feed(line, 0.0)
        assert tracker.failure == kind, line
        assert tracker.failure_line == line
    tracker = PhaseTracker()
    tracker.feed(list(cases)[3], 0.0)
    assert tracker.facts["estimated_max_model_len"] == 129536


def test_carriage_return_progress_bars_become_lines() -> None:
    text = "bar  0% | 0/50\rbar 50% | 25/50\rbar 100% | 50/50\nnext line\npartial"
    lines, rest = split_lines(text)
    assert lines == ["bar  0% | 0/50", "bar 50% | 25/50", "bar 100% | 50/50", "next line"]
    assert rest == "partial"


def test_unrelated_lines_are_ignored() -> None:
    assert parse_line('(APIServer pid=1) INFO:     127.0.0.1 - "GET /metrics" 200 OK') is None
