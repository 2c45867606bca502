"""vLLM log lines -> phases in order, facts, failures (reference/vllm.md §startup).

The logs in tests/data/vllm_logs/ are real vLLM 0.32 CPU runs captured whole (README there says
how) and GPU starts and failures written from vLLM's format strings (file paths cited there).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from fixtures.logcheck import assert_log_classified, notable_lines, unclassified_notable_lines

from appliance.engine import phases
from appliance.engine.phases import PhaseTracker, parse_line
from appliance.engine.runtime import split_lines

LOGS = Path(__file__).resolve().parents[1] / "data" / "vllm_logs"

A = "(APIServer pid=1) INFO 12-01 03:00:00 [api_utils.py:347] "
P = "(EngineCore_DP0 pid=42) INFO 12-01 03:00:00 [x.py:1] "
# A GPU start as vLLM logs it (format strings: tests/data/vllm_logs/README.md).
STARTUP = [
    A,
    A + "       █     █     █▄   ▄█",
    A + " ▄▄ ▄█ █     █     █ ▀▄▀ █  version 0.23.0",
    A + "  █▄█▀ █     █     █     █  model   stepfun-ai/Step-3.7-Flash-FP8",
    A + "   ▀▀  ▀▀▀▀▀ ▀▀▀▀▀ ▀     ▀",
    "(APIServer pid=1) INFO 12-01 03:00:00 [model.py:1] Resolved architecture: "
    "Step3p7ForConditionalGeneration",
    "(APIServer pid=1) INFO 12-01 03:00:00 [model.py:1] Using max model len 262144",
    P + "Initializing a V1 LLM engine (v0.23.0) with config: model='x'",
    P + "Starting to load model stepfun-ai/Step-3.7-Flash-FP8...",
    "Loading safetensors checkpoint shards:  42% Completed | 21/50 [00:10<00:12, 2.0it/s]",
    P + "Loading weights took 123.45 seconds",
    P + "Model loading took 198.31 GiB memory and 130.2 seconds",
    P + "Starting torch.compile",
    P + "Dynamo bytecode transform time: 9.87 s",
    P + "torch.compile took 41.20 s in total",
    P + "Available KV cache memory: 18.5 GiB",
    P + "GPU KV cache size: 808,000 tokens, Maximum concurrency for 262,144 tokens per request: "
    "3.08x",
    "Capturing CUDA graphs (mixed prefill-decode, PIECEWISE): 100%|██████████| 51/51 [00:05<00:00]",
    P + "Graph capturing finished in 12 secs, took 1.21 GiB",
    P + "init engine (profile, create kv cache, warmup model) took 70.10 s (compilation: 41.20 s)",
    "(APIServer pid=1) INFO 12-01 03:00:00 [entry.py:140] Starting vLLM server on "
    "http://0.0.0.0:8000",
    "(APIServer pid=1) INFO 12-01 03:00:00 [launcher.py:195] Route: /health, Methods: GET",
    "(APIServer pid=1) INFO:     Application startup complete.",
]
FIRST = {  # index (1-based, as fed below) of the first line of each phase in STARTUP
    phases.INITIALIZING: 3,
    phases.LOADING_WEIGHTS: 9,
    phases.COMPILING: 13,
    phases.KV_CACHE: 16,
    phases.CUDA_GRAPHS: 18,
    phases.API_SERVER: 21,
}


def track(text_or_lines: str | list[str]) -> PhaseTracker:
    """Feed a log to a tracker as the runtimes do: split on \\r and \\n, one line per second."""
    if isinstance(text_or_lines, str):
        lines, rest = split_lines(text_or_lines)
        text_or_lines = [*lines, rest]
    tracker = PhaseTracker()
    tracker.begin(0.0)
    for i, line in enumerate(text_or_lines, start=1):
        tracker.feed(line, float(i))
    return tracker


def test_startup_lines_give_every_phase_in_order_with_times() -> None:
    tracker = track(STARTUP)
    names = [p.name for p in tracker.phases]
    assert names == list(phases.LOG_PHASES)
    assert {p.name: p.started_at for p in tracker.phases[1:]} == FIRST
    # each phase but the last is closed by the next; elapsed = gap between their first lines
    assert all(p.done for p in tracker.phases[:-1])
    assert not tracker.phases[-1].done
    weights = tracker.phases[2]
    assert weights.elapsed_s == FIRST[phases.COMPILING] - FIRST[phases.LOADING_WEIGHTS]
    assert weights.detail == "21/50 shards"
    tracker.close(30.0)
    assert tracker.phases[-1].done
    assert tracker.phases[-1].elapsed_s == 30.0 - FIRST[phases.API_SERVER]


def test_facts_parsed_from_the_log() -> None:
    facts = track(STARTUP).facts
    assert facts["vllm_version"] == "0.23.0"
    assert facts["architecture"] == "Step3p7ForConditionalGeneration"
    assert facts["kv_cache_tokens"] == 808_000
    assert facts["max_model_len"] == 262_144
    assert facts["max_concurrency"] == 3.08
    assert facts["kv_cache_gib"] == 18.5
    assert facts["weights_gib"] == 198.31
    assert facts["compile_s"] == 41.2
    assert facts["graph_capture_s"] == 12.0
    assert facts["engine_init_s"] == 70.1


def test_version_from_the_one_line_form_and_never_from_api_server_version() -> None:
    line = A + "vLLM server version 0.32.0, serving model /models/tiny-std"
    assert track([line]).facts["vllm_version"] == "0.32.0"
    assert [p.name for p in track([line]).phases] == [phases.LAUNCHING, phases.INITIALIZING]
    # No vLLM prints this (0.16, 0.23, 0.32); the parser must not depend on it.
    assert parse_line(A + "vLLM API server version 0.16.0") is None


def test_older_two_line_kv_capacity_and_takes_wording() -> None:
    facts = track(
        [
            P + "torch.compile takes 41.20 s in total",
            P + "GPU KV cache size: 808,000 tokens",
            P + "Maximum concurrency for 262,144 tokens per request: 3.08x",
        ]
    ).facts
    assert facts["compile_s"] == 41.2
    assert (facts["kv_cache_tokens"], facts["max_model_len"]) == (808_000, 262_144)


def test_cpu_compile_and_kv_lines() -> None:
    tracker = track(
        [
            P + "Warming up model for the compilation...",
            P + "[backbone] saved AOT compiled function to /root/.cache/vllm/x/model",
            P + "Initial profiling/warmup run took 0.04 s",
            P + "Warming up done.",
            P + "Auto set (4.6/10.59) GiB for KV cache on node 0, with 9.74 GiB requested memory "
            "for the worker. 0.5 GiB memory was consumed by non-kv usages.",
            P + "CPU KV cache size: 4,828,544 tokens, Maximum concurrency for 4,096 tokens per "
            "request: 1178.84x",
        ]
    )
    assert [p.name for p in tracker.phases] == [phases.LAUNCHING, phases.COMPILING, phases.KV_CACHE]
    assert tracker.phases[1].started_at == 1.0
    assert tracker.phases[2].started_at == 5.0
    assert tracker.facts["kv_cache_tokens"] == 4_828_544
    assert tracker.facts["kv_cache_gib"] == 4.6
    assert tracker.facts["max_concurrency"] == 1178.84


def test_phases_never_go_backwards() -> None:
    tracker = PhaseTracker()
    tracker.feed(P + "Available KV cache memory: 1 GiB", 1.0)
    tracker.feed(P + "torch.compile took 3.0 s in total", 2.0)  # an earlier phase's line
    assert [p.name for p in tracker.phases] == [phases.KV_CACHE]


FAILURES = {
    "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB.": phases.CUDA_OOM,
    "(EngineCore_DP0 pid=7) ERROR 12-01 03:00:00 [core.py:1105] torch.AcceleratorError: CUDA "
    "error: out of memory": phases.CUDA_OOM,
    "torch.AcceleratorError: CUDA error: an illegal memory access was encountered": (
        phases.CUDA_ERROR
    ),
    "RuntimeError: CUDA error: an illegal memory access was encountered": phases.CUDA_ERROR,
    "ValueError: No available memory for the cache blocks. Try increasing": phases.KV_NO_MEMORY,
    "ValueError: The model's max seq len (262144) is larger than the maximum number of tokens "
    "that can be stored in KV cache (100000).": phases.MAX_LEN_TOO_LARGE,
    "ValueError: To serve at least one request with the models's max seq len (262144), "
    "(12.00 GiB KV cache is needed, which is larger than the available KV cache memory "
    "(5.93 GiB). Based on the available memory, the estimated maximum model length is "
    "129536.": phases.MAX_LEN_TOO_LARGE,
    "ValueError: Free memory on device cuda:0 (180.5/235.82 GiB) on startup is less than desired "
    "GPU memory utilization (0.95, 224.03 GiB). Decrease GPU memory utilization or reduce GPU "
    "memory used by other processes.": phases.MEMORY_IN_USE,
    "ValueError: Available memory on node 0 (14.01/16.46 GiB) on startup is less than desired "
    "CPU memory utilization (0.99, 16.3 GiB).": phases.MEMORY_IN_USE,
    "RuntimeError: Engine core initialization failed. See root cause above. Failed core proc(s): "
    "{'EngineCore': 1}": phases.ENGINE_INIT_FAILED,
    "pydantic_core._pydantic_core.ValidationError: 1 validation error for ModelConfig": (
        phases.CONFIG_INVALID
    ),
    "vllm: error: unrecognized arguments: --disable-cascade-attn": phases.UNKNOWN_ARGUMENT,
    "(APIServer pid=7) WARNING 12-01 03:33:43 [core_client.py:817] [shutdown] MPClient: engine "
    "core exited unexpectedly; starting cleanup": phases.ENGINE_DIED,
    "NotImplementedError: FP8 KV cache on CPU requires x86 with AVX-512 or AMX.": (
        phases.NOT_SUPPORTED
    ),
    "vllm serve: error: argument --port: invalid int value: 'x'": phases.BAD_ARGUMENT,
    # vLLM 0.32 binding `--uds` over a file already there (or a taken port), then exit 1
    "OSError: [Errno 98] Address already in use": phases.ADDRESS_IN_USE,
}


@pytest.mark.parametrize(("line", "kind"), list(FAILURES.items()))
def test_failures_are_recognised(line: str, kind: str) -> None:
    tracker = PhaseTracker()
    tracker.feed(line, 0.0)
    assert tracker.failure == kind
    assert tracker.failure_line == line


def test_failure_facts() -> None:
    assert track([list(FAILURES)[6]]).facts["estimated_max_model_len"] == 129536
    unknown = track(["vllm: error: unrecognized arguments: --disable-cascade-attn --foo"])
    assert unknown.facts["unknown_arguments"] == "--disable-cascade-attn --foo"


def test_generic_failure_gives_way_to_the_root_cause_but_not_the_reverse() -> None:
    generic = "RuntimeError: Engine core initialization failed. See root cause above."
    cause = (
        "ValueError: Available memory on node 0 (1/16 GiB) on startup is less than desired CPU "
        "memory utilization (0.99, 16.3 GiB)."
    )
    tracker = track([generic, cause])  # the processes' lines interleave
    assert (tracker.failure, tracker.failure_line) == (phases.MEMORY_IN_USE, cause)
    tracker = track([cause, generic])
    assert (tracker.failure, tracker.failure_line) == (phases.MEMORY_IN_USE, cause)
    died = "RuntimeError: Process EngineCore (PID: 7) died with exit code -9"
    tracker = track([died, generic])  # the first generic line stays
    assert (tracker.failure, tracker.failure_line) == (phases.ENGINE_DIED, died)


def test_validation_error_reason_becomes_the_failure_line() -> None:
    tracker = track(
        [
            "pydantic_core._pydantic_core.ValidationError: 1 validation error for ModelConfig",
            "  Value error, Sleep mode is not supported on current platform. [type=value_error, "
            "input_value=ArgsKwargs((), {}), input_type=ArgsKwargs]",
        ]
    )
    assert tracker.failure == phases.CONFIG_INVALID
    assert tracker.failure_line == "Value error, Sleep mode is not supported on current platform."


def test_every_failure_kind_has_a_hint_and_the_memory_kinds_are_retryable() -> None:
    assert set(FAILURES.values()) <= set(phases.FAILURE_HINTS)
    assert all(hint.endswith((".", ").")) for hint in phases.FAILURE_HINTS.values())
    assert {
        phases.CUDA_OOM,
        phases.MAX_LEN_TOO_LARGE,
        phases.MEMORY_IN_USE,
    } == phases.RETRYABLE_FAILURES
    assert phases.is_retryable(phases.MEMORY_IN_USE)
    assert not phases.is_retryable(phases.UNKNOWN_ARGUMENT)
    assert not phases.is_retryable(None)


def test_carriage_return_progress_bars_become_lines() -> None:
    text = "bar  0% | 0/50\rbar 50% | 25/50\rbar 100% | 50/50\nnext line\npartial"
    lines, rest = split_lines(text)
    assert lines == ["bar  0% | 0/50", "bar 50% | 25/50", "bar 100% | 50/50", "next line"]
    assert rest == "partial"


def test_unrelated_lines_are_ignored() -> None:
    assert parse_line('(APIServer pid=1) INFO:     127.0.0.1 - "GET /metrics" 200 OK') is None


# ------------------------------------------------------------------ the logs of tests/data


def test_logcheck_flags_a_notable_line_the_parser_misses() -> None:
    text = "\n".join(
        [
            A + "Loading weights took 1.00 seconds",  # classified
            P + "SomeNewError: the engine could not frobnicate",  # notable, unclassified
            "Traceback (most recent call last):",
            '  File "/x/memory_utils.py", line 3, in allocate',  # a frame: not checked
            "    raise MemoryError('boom')",
            "MemoryError: boom",  # the exception line: checked
            P + "Found ulimit of 20000 and failed to automatically increase with error x",
            'INFO:     127.0.0.1:47382 - "GET /version HTTP/1.1" 200 OK',  # an access log line
            "(APIServer pid=1) INFO 12-01 03:55:22 [loggers.py:335] Engine 000: Avg prompt "
            "throughput: 157.7 tokens/s, Running: 0 reqs, CPU KV cache usage: 0.0%",
        ]
    )
    assert unclassified_notable_lines(text) == [
        P + "SomeNewError: the engine could not frobnicate",
        "MemoryError: boom",
    ]
    with pytest.raises(AssertionError, match="frobnicate"):
        assert_log_classified(text)


LOG_FILES = sorted(LOGS.glob("*.log"))


def test_the_captured_logs_are_there() -> None:
    names = {p.name for p in LOG_FILES}
    assert set(EXPECTED) <= names, set(EXPECTED) - names


@pytest.mark.parametrize("path", LOG_FILES, ids=lambda p: p.name)
def test_every_notable_line_of_every_log_is_classified(path: Path) -> None:
    text = path.read_text(errors="replace")
    assert notable_lines(text), "a log with nothing notable checks nothing"
    assert_log_classified(text, path.name)


CPU_START = [
    phases.LAUNCHING,
    phases.INITIALIZING,
    phases.LOADING_WEIGHTS,
    phases.COMPILING,
    phases.KV_CACHE,
    phases.API_SERVER,
]  # no CUDA graphs on CPU
GPU_START = list(phases.LOG_PHASES)
# file -> (phases in order, facts that must be there, failure kind)
EXPECTED: dict[str, tuple[list[str], dict[str, Any], str | None]] = {
    "cpu-0.32-unknown-flag.log": (
        [phases.LAUNCHING],
        {"unknown_arguments": "--no-such-flag"},
        phases.UNKNOWN_ARGUMENT,
    ),
    "cpu-0.32-sleep-mode-refused.log": (
        [phases.LAUNCHING, phases.INITIALIZING],
        {"vllm_version": "0.32.0"},
        phases.CONFIG_INVALID,
    ),
    "cpu-0.32-std-memory-refused.log": (
        [phases.LAUNCHING, phases.INITIALIZING],
        {"vllm_version": "0.32.0", "architecture": "Qwen2ForCausalLM"},
        phases.MEMORY_IN_USE,
    ),
    # Ready, then SIGTERM: 0.32 stops in 0.3 s and (here) logs no EngineDeadError traceback.
    "cpu-0.32-std-start-logo-sigterm.log": (
        CPU_START,
        {
            "vllm_version": "0.32.0",
            "architecture": "Qwen2ForCausalLM",
            "kv_cache_gib": 1.0,
            "kv_cache_tokens": 1_048_576,
            "max_model_len": 4096,
            "max_concurrency": 256.0,
            "engine_init_s": 73.01,
        },
        None,
    ),
    # VLLM_DISABLE_LOG_LOGO=1, ready, then the EngineCore process killed (SIGKILL): the API server
    # logs "engine core exited unexpectedly" and an EngineDeadError, and exits 0.
    "cpu-0.32-std-start-nologo-enginecore-killed.log": (
        CPU_START,
        {"vllm_version": "0.32.0", "kv_cache_tokens": 1_048_576, "max_model_len": 4096},
        phases.ENGINE_DIED,
    ),
    # The real Step-3.7 architecture, dummy weights (no shard bar, no "Loading weights took").
    "cpu-0.32-step-start-nologo-sigterm.log": (
        CPU_START,
        {
            "vllm_version": "0.32.0",
            "architecture": "Step3p7ForConditionalGeneration",
            "kv_cache_tokens": 1_342_177,
            "max_concurrency": 327.68,
        },
        None,
    ),
    # This machine's CPU has no AVX-512: vLLM compiles, sizes the KV cache, then refuses FP8 KV.
    "cpu-0.32-std-fp8-kv-cache-refused.log": (
        CPU_START[:-1],
        {
            "vllm_version": "0.32.0",
            "kv_cache_gib": 1.0,
            "kv_cache_tokens": 2_097_152,
            "max_model_len": 4096,
            "max_concurrency": 512.0,
        },
        phases.NOT_SUPPORTED,
    ),
    # A stop during start logs "Worker proc ... died unexpectedly" and "EngineCore failed to
    # start." (generic failure lines): a stop the supervisor asked for is judged by the request.
    "cpu-0.32-sigterm-while-compiling.log": (
        CPU_START[:4],
        {"vllm_version": "0.32.0", "weights_load_s": 0.05},
        phases.ENGINE_DIED,
    ),
    "gpu-from-source-start.log": (
        GPU_START,
        {
            "vllm_version": "0.23.0",
            "kv_cache_tokens": 808_000,
            "max_model_len": 262_144,
            "compile_s": 41.2,
            "graph_capture_s": 12.0,
        },
        None,
    ),
    "gpu-from-source-cuda-oom.log": (
        [phases.LAUNCHING, phases.INITIALIZING, phases.LOADING_WEIGHTS],
        {"vllm_version": "0.23.0", "weights_gib": 198.31},
        phases.CUDA_OOM,
    ),
    "gpu-from-source-memory-in-use.log": (
        [phases.LAUNCHING, phases.INITIALIZING],
        {"vllm_version": "0.23.0"},
        phases.MEMORY_IN_USE,
    ),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_phases_facts_and_failure_of_each_log(name: str) -> None:
    want_phases, want_facts, want_failure = EXPECTED[name]
    tracker = track((LOGS / name).read_text(errors="replace"))
    assert [p.name for p in tracker.phases] == want_phases
    assert {k: tracker.facts.get(k) for k in want_facts} == want_facts
    assert tracker.failure == want_failure, tracker.failure_line
