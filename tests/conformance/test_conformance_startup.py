"""Start-up as vLLM does it: argv, log lines in order with tqdm bars, port closed until ready.

The phase parser (appliance/engine/phases.py) reads every start log here, the real engine's
(vLLM 0.32 CPU) and the simulator's (vLLM 0.23's GPU lines), and every line that names a phase
or a failure must be one it classifies (tests/fixtures/logcheck.py).
"""

from __future__ import annotations

import re
import time

import pytest
from conformance_servers import client_for, http_status, vllm_version, wait_until
from fixtures.logcheck import assert_log_classified

from appliance.engine import phases
from appliance.engine.phases import PhaseTracker
from appliance.engine.runtime import split_lines

# Log lines (stdout) in the order the simulator prints them: vLLM 0.23's GPU start of the
# Station's FP8 profile (reference/vllm.md, startup; tests/data/vllm_logs/README.md).
ORDER = (
    " version 0.23.0",  # the ASCII logo (VLLM_DISABLE_LOG_LOGO unset)
    "  model   stepfun-ai/Step-3.7-Flash-FP8",
    "Resolved architecture: Step3p7ForConditionalGeneration",
    "Initializing a V1 LLM engine",
    "Starting to load model stepfun-ai/Step-3.7-Flash-FP8...",
    "Loading weights took",
    "Model loading took",
    "torch.compile took",
    "Available KV cache memory:",
    "GPU KV cache size:",
    "Maximum concurrency for 262,144 tokens per request:",
    "Graph capturing finished in",
    "init engine (profile, create kv cache, warmup model) took",
    "Starting vLLM server on http://",
    "Route: /health, Methods: GET",
    "Application startup complete.",
)
# What every start logs, real (0.32 CPU) or simulated, in this order. (The CPU build logs no
# "Model loading took"; with --load-format dummy, as real-step runs, no "Loading weights took".)
COMMON_ORDER = (
    "Resolved architecture: ",
    "Initializing a V1 LLM engine",
    "Starting to load model ",
    " KV cache size: ",
    "init engine (profile, create kv cache, warmup model) took",
    "Starting vLLM server on http://",
    "Route: /health, Methods: GET",
    "Application startup complete.",
)


def _in_order(logs: str, markers: tuple[str, ...]) -> None:
    positions = [logs.find(marker) for marker in markers]
    assert -1 not in positions, [m for m, p in zip(markers, positions, strict=True) if p < 0]
    assert positions == sorted(positions), markers


def _tracked(logs: str) -> PhaseTracker:
    lines, rest = split_lines(logs)
    tracker = PhaseTracker()
    tracker.begin(0.0)
    for i, line in enumerate([*lines, rest], start=1):
        tracker.feed(line, float(i))
    return tracker


def test_start_log_phases_in_order_all_classified(server) -> None:
    logs = server.logs()
    # The start only: the shared server may have served other modules' tests already.
    end = logs.find("Application startup complete.")
    logs = logs[: logs.index("\n", end) + 1] if end >= 0 and "\n" in logs[end:] else logs
    _in_order(logs, COMMON_ORDER)
    assert_log_classified(logs, f"the {server.model_kind} start log")
    tracker = _tracked(logs)
    expected = list(phases.LOG_PHASES)
    if not server.simulated:
        expected.remove(phases.CUDA_GRAPHS)  # the CPU build captures no CUDA graphs
        # The suite's own real engines run eager (tests/fixtures/realvllm.py TEST_ENGINE_FLAGS):
        # nothing compiles. The "Compiling" phase of a real start is read in the Docker and
        # process routes' real starts (test_real_engine_docker.py, test_real_engine_process.py).
        assert "--enforce-eager" in server.process.argv
        expected.remove(phases.COMPILING)
    assert [p.name for p in tracker.phases] == expected
    facts = tracker.facts
    version = tuple(int(p) for p in str(facts["vllm_version"]).split(".")[:3])
    assert version == vllm_version(server)  # from the logo, as GET /version says
    assert facts["kv_cache_tokens"] > 0
    assert facts["max_model_len"] == facts["model_max_len"]
    assert tracker.failure is None, tracker.failure_line


def test_port_is_closed_until_ready_and_logs_come_in_order(launch) -> None:
    server = launch(load_s=2.5, wait=False)
    seen = []

    def ready() -> bool:
        assert server.exit_code() is None, server.logs()[-2000:]
        status = http_status(f"{server.url}/health", timeout=0.5)
        seen.append(status)
        return status == 200

    wait_until(ready, 60, "/health 200", lambda: server.logs()[-2000:])
    assert seen[0] is None, "the port must refuse connections while the model loads"
    assert set(seen[:-1]) <= {None}
    logs = server.logs()
    _in_order(logs, ORDER)
    assert_log_classified(logs, "the simulator's start log")
    assert "\rLoading safetensors checkpoint shards:" in logs
    assert "Loading safetensors checkpoint shards: 100% Completed | 50/50" in logs
    assert "\rCapturing CUDA graphs (mixed prefill-decode, PIECEWISE): 100%" in logs
    assert "\rCapturing CUDA graphs (decode, FULL): 100%" in logs
    assert "GPU KV cache size: 806,736 tokens" in logs  # FP8 weights + FP8 KV at 0.95 on GB300


@pytest.mark.parametrize("extra", ["--no-such-flag", "serve"])
def test_unknown_arguments_exit_2_like_vllm(launch, extra: str) -> None:
    if not launch.simulated:
        pytest.skip("cannot relaunch a remote vLLM")
    server = launch(extra, wait=False)
    assert server.exit_code(timeout=30) == 2
    logs = server.logs()
    # Real vLLM (0.32, tests/data/vllm_logs/cpu-0.32-unknown-flag.log) reports it from the
    # top-level parser, after its usage: `vllm: error: unrecognized arguments: X`.
    assert re.search(rf"^vllm: error: unrecognized arguments: {extra}$", logs, re.M)
    assert re.search(r"^usage: vllm \[-h\] \[-v\]$", logs, re.M)
    tracker = _tracked(logs)
    assert tracker.failure == phases.UNKNOWN_ARGUMENT
    assert tracker.facts["unknown_arguments"] == extra


def test_served_names_and_max_model_len(launch) -> None:
    server = launch("--served-model-name", "a", "b", "--max-model-len", "32k")
    models = client_for(server).models.list().data
    assert [m.id for m in models] == ["a", "b"]
    assert {m.model_extra["max_model_len"] for m in models} == {32000}
    reply = client_for(server).chat.completions.create(
        model="b", messages=[{"role": "user", "content": "hi"}], max_tokens=3
    )
    assert reply.model == "b"


def test_throughput_line_while_serving(launch) -> None:
    server = launch(log_interval_s=0.3)
    client_for(server).chat.completions.create(
        model=server.model, messages=[{"role": "user", "content": "hi"}], max_tokens=20
    )
    wait_until(
        lambda: "Engine 000: Avg prompt throughput:" in server.logs(),
        30,
        "the periodic Engine 000 throughput line",
    )
    assert "Avg generation throughput:" in server.logs()


def test_token_rate_knob_paces_the_stream(launch) -> None:
    server = launch(tokens_per_s=40, ttft_ms=0)
    started = time.monotonic()
    reply = client_for(server).chat.completions.create(
        model=server.model,
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=21,
        extra_body={"ignore_eos": True},
    )
    assert reply.usage.completion_tokens == 21
    # A lower bound only: 21 tokens at 40/s cannot arrive in under 0.5 s.
    assert time.monotonic() - started >= 0.5
