"""The engine metrics scrape: vLLM's exposition text -> typed numbers, rates from counters."""

from __future__ import annotations

import httpx
import pytest

from appliance.errors import EngineError
from appliance.monitoring.metrics import (
    MetricsScraper,
    histogram_quantile,
    parse_metrics,
    relevant_text,
    summarize,
)

LABELS = 'engine="0",model_name="step3p7-flash"'


def exposition(
    *,
    prompt: float = 1000.0,
    generation: float = 5000.0,
    running: int = 2,
    waiting: int = 1,
    kv: float = 0.25,
    sleep_state: str = "awake",
    spec: bool = True,
) -> str:
    lines = [
        "# HELP vllm:num_requests_running Number of requests in model execution batches.",
        "# TYPE vllm:num_requests_running gauge",
        f"vllm:num_requests_running{{{LABELS}}} {running}.0",
        "# TYPE vllm:num_requests_waiting gauge",
        f"vllm:num_requests_waiting{{{LABELS}}} {waiting}.0",
        "# TYPE vllm:kv_cache_usage_perc gauge",
        f"vllm:kv_cache_usage_perc{{{LABELS}}} {kv}",
        "# TYPE vllm:prompt_tokens_total counter",
        f"vllm:prompt_tokens_total{{{LABELS}}} {prompt}",
        "# TYPE vllm:generation_tokens_total counter",
        f"vllm:generation_tokens_total{{{LABELS}}} {generation}",
        "# TYPE vllm:prefix_cache_queries_total counter",
        f"vllm:prefix_cache_queries_total{{{LABELS}}} 400.0",
        "# TYPE vllm:prefix_cache_hits_total counter",
        f"vllm:prefix_cache_hits_total{{{LABELS}}} 100.0",
        "# TYPE vllm:time_to_first_token_seconds histogram",
        f'vllm:time_to_first_token_seconds_bucket{{{LABELS},le="0.1"}} 2.0',
        f'vllm:time_to_first_token_seconds_bucket{{{LABELS},le="0.5"}} 6.0',
        f'vllm:time_to_first_token_seconds_bucket{{{LABELS},le="1.0"}} 10.0',
        f'vllm:time_to_first_token_seconds_bucket{{{LABELS},le="+Inf"}} 10.0',
        f"vllm:time_to_first_token_seconds_count{{{LABELS}}} 10.0",
        f"vllm:time_to_first_token_seconds_sum{{{LABELS}}} 4.2",
        "# TYPE vllm:engine_sleep_state gauge",
    ]
    for state in ("awake", "weights_offloaded", "discard_all"):
        value = 1.0 if state == sleep_state else 0.0
        lines.append(f'vllm:engine_sleep_state{{{LABELS},sleep_state="{state}"}} {value}')
    if spec:
        lines += [
            "# TYPE vllm:spec_decode_num_drafts_total counter",
            f"vllm:spec_decode_num_drafts_total{{{LABELS}}} 100.0",
            "# TYPE vllm:spec_decode_num_draft_tokens_total counter",
            f"vllm:spec_decode_num_draft_tokens_total{{{LABELS}}} 300.0",
            "# TYPE vllm:spec_decode_num_accepted_tokens_total counter",
            f"vllm:spec_decode_num_accepted_tokens_total{{{LABELS}}} 161.0",
        ]
    return "\n".join(lines) + "\n"


def test_summary_reads_every_number() -> None:
    m = summarize(parse_metrics(exposition()), at=10.0)
    assert (m.running, m.waiting) == (2, 1)
    assert m.kv_cache_usage_pct == pytest.approx(25.0)
    assert m.prefix_cache_hit_pct == pytest.approx(25.0)
    assert m.spec_acceptance_pct == pytest.approx(100 * 161 / 300)
    assert m.spec_mean_acceptance_length == pytest.approx(2.61)
    # rank 5 of 10 lies in the (0.1, 0.5] bucket holding ranks 3..6: 0.1 + 0.4 * 3/4
    assert m.ttft_median_s == pytest.approx(0.4)
    assert m.sleep_state == "awake"
    assert m.prompt_tokens_per_s is None  # a rate needs two scrapes


def test_rates_come_from_counter_differences() -> None:
    before = parse_metrics(exposition(prompt=1000, generation=5000))
    after = parse_metrics(exposition(prompt=1600, generation=5462))
    m = summarize(after, at=12.0, previous=(10.0, before))
    assert m.prompt_tokens_per_s == pytest.approx(300.0)
    assert m.generation_tokens_per_s == pytest.approx(231.0)


def test_counter_reset_gives_no_rate() -> None:
    before = parse_metrics(exposition(generation=5000))
    after = parse_metrics(exposition(generation=10))
    assert summarize(after, at=2.0, previous=(1.0, before)).generation_tokens_per_s is None


def test_missing_metrics_are_none() -> None:
    m = summarize(parse_metrics(exposition(spec=False, sleep_state="none")), at=1.0)
    assert m.spec_acceptance_pct is None
    assert m.spec_mean_acceptance_length is None
    assert m.sleep_state is None
    empty = summarize(parse_metrics(""), at=1.0)
    assert empty.running is None
    assert empty.kv_cache_usage_pct is None
    assert empty.ttft_median_s is None


def test_sleep_state_offloaded() -> None:
    m = summarize(parse_metrics(exposition(sleep_state="weights_offloaded")), at=1.0)
    assert m.sleep_state == "weights_offloaded"


@pytest.mark.parametrize(
    ("buckets", "q", "expected"),
    [
        ([(1.0, 0.0), (float("inf"), 0.0)], 0.5, None),
        ([(1.0, 4.0), (2.0, 8.0), (float("inf"), 8.0)], 0.5, 1.0),
        ([(1.0, 0.0), (2.0, 0.0), (float("inf"), 4.0)], 0.5, 2.0),
        ([(0.5, 10.0), (float("inf"), 10.0)], 0.5, 0.25),
    ],
)
def test_histogram_quantile(buckets, q, expected) -> None:
    assert histogram_quantile(buckets, q) == expected


def test_scraper_over_http_computes_rates() -> None:
    texts = iter([exposition(generation=100), exposition(generation=400)])
    clock = iter([1.0, 3.0])

    def handler(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/metrics"
        return httpx.Response(200, text=next(texts))

    scraper = MetricsScraper(
        httpx.Client(transport=httpx.MockTransport(handler)), clock=lambda: next(clock)
    )
    assert scraper.scrape("http://engine/").generation_tokens_per_s is None
    assert scraper.scrape("http://engine").generation_tokens_per_s == pytest.approx(150.0)


def test_scraper_error_is_an_engine_error() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    scraper = MetricsScraper(httpx.Client(transport=httpx.MockTransport(handler)))
    with pytest.raises(EngineError, match="metrics"):
        scraper.scrape("http://127.0.0.1:1")


def test_scrape_of_the_simulator_counts_a_real_request(simulator) -> None:
    """The real path: the simulator's /metrics over HTTP, one chat request through the SDK."""
    from openai import OpenAI

    url = simulator(tokens_per_s=2000)
    scraper = MetricsScraper()
    before = scraper.scrape(url)
    assert before.running == 0
    assert before.waiting == 0
    assert before.kv_cache_usage_pct == 0.0
    assert before.sleep_state == "awake"
    assert before.ttft_median_s is None  # no request yet: the histogram is empty

    client = OpenAI(base_url=f"{url}/v1", api_key="none")
    reply = client.chat.completions.create(
        model="step3p7-flash",
        messages=[{"role": "user", "content": "Count to five."}],
        max_tokens=40,
        extra_body={"reasoning_effort": "low"},
    )
    assert reply.usage is not None

    after = scraper.scrape(url)
    assert after.generation_tokens_total is not None
    assert before.generation_tokens_total is not None
    assert after.generation_tokens_total - before.generation_tokens_total == (
        reply.usage.completion_tokens
    )
    assert after.prompt_tokens_total - before.prompt_tokens_total == reply.usage.prompt_tokens
    assert after.generation_tokens_per_s is not None
    assert after.generation_tokens_per_s > 0
    assert after.ttft_median_s is not None
    scraper.close()


def test_only_the_families_read_are_parsed() -> None:
    other = (
        "# HELP vllm:e2e_request_latency_seconds Histogram of e2e request latency.\n"
        "# TYPE vllm:e2e_request_latency_seconds histogram\n"
        f'vllm:e2e_request_latency_seconds_bucket{{{LABELS},le="1.0"}} 3.0\n'
        f"vllm:num_preemptions_total{{{LABELS}}} 7.0\n"
    )
    kept = relevant_text(other + exposition())
    assert "e2e_request_latency" not in kept
    assert "num_preemptions" not in kept
    assert "vllm:time_to_first_token_seconds_bucket" in kept
    assert "# TYPE vllm:prompt_tokens_total counter" in kept
    assert "vllm:engine_sleep_state{" in kept
    parsed = parse_metrics(other + exposition())
    assert "vllm:num_preemptions_total" not in parsed.samples
    assert summarize(parsed, 1.0).ttft_median_s == pytest.approx(0.4)


def test_the_ttft_histogram_is_parsed_again_only_after_tokens_moved() -> None:
    """Idle, the scraper reuses the last TTFT histogram (most of the lines it parses); once the
    prompt or generation counters move it reads the histogram again."""
    slow = exposition().replace('le="0.5"} 6.0', 'le="0.5"} 2.0')  # median moves to 0.5-1.0 s
    texts = iter([exposition(), slow, exposition(generation=5001.0).replace(
        'le="0.5"} 6.0', 'le="0.5"} 2.0')])  # fmt: skip

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, text=next(texts))

    scraper = MetricsScraper(httpx.Client(transport=httpx.MockTransport(handler)))
    first = scraper.scrape("http://engine").ttft_median_s
    assert first == pytest.approx(0.4)
    assert scraper.scrape("http://engine").ttft_median_s == first  # no token since: reused
    moved = scraper.scrape("http://engine").ttft_median_s
    assert moved is not None
    assert moved > 0.5
