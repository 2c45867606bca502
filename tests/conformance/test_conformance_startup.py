"""Start-up as vLLM does it: argv, log lines in order with tqdm bars, port closed until ready."""

from __future__ import annotations

import time

import pytest
from conformance_servers import client_for, http_status, wait_until

# Log lines (stdout) in the order vLLM prints them (reference/vllm.md, startup).
ORDER = (
    "vLLM API server version",
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
    positions = [logs.find(marker) for marker in ORDER]
    assert -1 not in positions, [m for m, p in zip(ORDER, positions, strict=True) if p < 0]
    assert positions == sorted(positions)
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
    assert f"vllm serve: error: unrecognized arguments: {extra}" in server.logs()


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
