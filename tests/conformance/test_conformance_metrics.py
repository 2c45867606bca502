"""/metrics: vLLM's names and types, parsed by prometheus_client; values move with the traffic;
closing a stream aborts the request in the engine (the running gauge drops) without counting it
in request_success_total."""

from __future__ import annotations

import json
import time

import httpx
import pytest
from conformance_servers import Server, client_for, scrape, value, wait_until

EXPECTED = {
    "vllm:num_requests_running": "gauge",
    "vllm:num_requests_waiting": "gauge",
    "vllm:kv_cache_usage_perc": "gauge",
    "vllm:prompt_tokens": "counter",
    "vllm:generation_tokens": "counter",
    "vllm:prefix_cache_queries": "counter",
    "vllm:prefix_cache_hits": "counter",
    "vllm:num_preemptions": "counter",
    "vllm:request_success": "counter",
    "vllm:time_to_first_token_seconds": "histogram",
    "vllm:inter_token_latency_seconds": "histogram",
    "vllm:e2e_request_latency_seconds": "histogram",
}


def test_metrics_parse_with_vllm_names_and_types(server: Server) -> None:
    response = httpx.get(f"{server.url}/metrics", timeout=10)
    # prometheus_client's CONTENT_TYPE_LATEST (vllm/entrypoints/serve/instrumentator/metrics.py,
    # 0.23.0 and 0.32): the 1.0.0 text format with the prometheus_client of 2026.
    assert response.headers["content-type"] == "text/plain; version=1.0.0; charset=utf-8"
    families = scrape(server)
    for name, kind in EXPECTED.items():
        assert families[name].type == kind, name
    running = families["vllm:num_requests_running"].samples[0]
    assert running.labels["model_name"] == server.model
    assert "engine" in running.labels
    # Sleep state, where exposed: one series per state, each labelled (real 0.23 on an H200 had
    # exactly awake / weights_offloaded / discard_all; docs/runs/h200-vllm-0.23-notes.md).
    if "vllm:engine_sleep_state" in families:
        states = [x.labels.get("sleep_state") for x in families["vllm:engine_sleep_state"].samples]
        assert sorted(states) == ["awake", "discard_all", "weights_offloaded"], states


def test_counters_move_with_traffic(server: Server, client) -> None:
    before = scrape(server)
    reply = client.chat.completions.create(
        model=server.model,
        messages=[{"role": "user", "content": "count"}],
        reasoning_effort="low",
        max_tokens=30,
    )
    after = scrape(server)
    gen = "vllm:generation_tokens"
    prompt = "vllm:prompt_tokens"
    generated = value(after, gen, f"{gen}_total") - value(before, gen, f"{gen}_total")
    assert generated >= reply.usage.completion_tokens > 0
    assert value(after, prompt, f"{prompt}_total") - value(before, prompt, f"{prompt}_total") >= (
        reply.usage.prompt_tokens
    )
    ttft = "vllm:time_to_first_token_seconds"
    assert value(after, ttft, f"{ttft}_count") == value(before, ttft, f"{ttft}_count") + 1


def _stream_five_chunks_then_hang_up(server: Server, payload: dict) -> float:
    """Read five content chunks of a stream, then close it; the running gauge just before."""
    headers = {"Authorization": f"Bearer {server.api_key}"} if server.api_key else {}
    with (
        httpx.Client(timeout=60) as http,
        http.stream(
            "POST", f"{server.url}/v1/chat/completions", json=payload, headers=headers
        ) as response,
    ):
        # held until the scrape: a dropped line iterator closes the response (httpx)
        lines = response.iter_lines()
        seen = 0
        for line in lines:
            if (
                line.startswith("data: ")
                and "delta" in json.loads(line[6:]).get("choices", [{}])[0]
            ):
                seen += 1
            if seen >= 5:
                break
        return value(scrape(server), "vllm:num_requests_running")


def test_closing_the_stream_aborts_the_request(server: Server) -> None:
    success = "vllm:request_success"
    window = client_for(server).models.list().data[0].model_extra["max_model_len"]
    payload = {
        "model": server.model,
        "messages": [{"role": "user", "content": "Write a very long essay."}],
        # Long enough to still run after five chunks; within any window (real vLLM: 4096).
        "max_tokens": min(30000, window - 200),
        "ignore_eos": True,
        "stream": True,
    }
    # A tiny real model on a loaded 2-core machine may generate the whole window before a
    # starved client has read five chunks: then the request finished on its own and there is
    # nothing to abort. Such an attempt proves nothing either way; the next one is taken.
    for _attempt in range(3):
        before_all = scrape(server)
        aborted_before = value(before_all, success, f"{success}_total", finished_reason="abort")
        if _stream_five_chunks_then_hang_up(server, payload) >= 1:
            break
        wait_until(
            lambda: value(scrape(server), "vllm:num_requests_running") == 0,
            60,
            "the request that finished on its own to leave the running gauge",
        )
    else:
        pytest.fail("in 3 attempts the request never ran long enough to be hung up on")
    # The connection is closed: the engine must stop generating for it.
    started = time.monotonic()
    wait_until(
        lambda: value(scrape(server), "vllm:num_requests_running") == 0,
        20,
        "vllm:num_requests_running to drop to 0 after the client hung up",
    )
    assert time.monotonic() - started < 20
    # A client's abort is not a finished request: OutputProcessor.abort_requests drops it
    # without finished-request stats (vllm/v1/engine/output_processor.py, 0.23.0 and 0.32).
    after = scrape(server)
    assert value(after, success, f"{success}_total", finished_reason="abort") == aborted_before
    assert value(after, success, f"{success}_total") == value(
        before_all, success, f"{success}_total"
    )


def test_speculative_decoding_counters(launch) -> None:
    server = launch("--speculative-config", '{"method": "mtp", "num_speculative_tokens": 3}')
    client_for(server).chat.completions.create(
        model=server.model,
        messages=[{"role": "user", "content": "go"}],
        max_tokens=200,
        extra_body={"ignore_eos": True},
    )
    families = scrape(server)
    drafts = value(families, "vllm:spec_decode_num_drafts", "vllm:spec_decode_num_drafts_total")
    draft_tokens = value(
        families, "vllm:spec_decode_num_draft_tokens", "vllm:spec_decode_num_draft_tokens_total"
    )
    accepted = value(
        families,
        "vllm:spec_decode_num_accepted_tokens",
        "vllm:spec_decode_num_accepted_tokens_total",
    )
    assert drafts > 0
    assert draft_tokens == 3 * drafts
    assert 0 < accepted <= draft_tokens
