"""vLLM's Prometheus metrics, written in the text exposition format without prometheus_client.

Names, types and labels follow vLLM V1 (`model_name`, `engine`; counters end in `_total`).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

LabelKey = tuple[tuple[str, str], ...]

TTFT_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
    160.0,
    640.0,
    2560.0,
)
ITL_BUCKETS = (
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)
E2E_BUCKETS = (
    0.3,
    0.5,
    0.8,
    1.0,
    1.5,
    2.0,
    2.5,
    5.0,
    10.0,
    15.0,
    20.0,
    30.0,
    40.0,
    50.0,
    60.0,
    120.0,
    240.0,
    480.0,
    960.0,
    1920.0,
    7680.0,
)
TOKEN_BUCKETS = (
    1,
    2,
    5,
    10,
    20,
    50,
    100,
    200,
    500,
    1000,
    2000,
    5000,
    10000,
    20000,
    50000,
    100000,
    200000,
)


def _labels(key: LabelKey) -> str:
    if not key:
        return ""
    inner = ",".join(f'{k}="{_escape(v)}"' for k, v in key)
    return "{" + inner + "}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _num(value: float) -> str:
    if value == float("inf"):
        return "+Inf"
    return repr(float(value))


@dataclass
class Metric:
    name: str
    help: str
    kind: str  # counter | gauge | histogram
    base: LabelKey
    buckets: tuple[float, ...] = ()
    values: dict[LabelKey, float] = field(default_factory=dict)
    hist: dict[LabelKey, list[float]] = field(default_factory=dict)  # bucket counts + sum + count

    def _key(self, labels: dict[str, str] | None) -> LabelKey:
        return self.base + tuple(sorted((labels or {}).items()))

    def inc(self, amount: float = 1.0, labels: dict[str, str] | None = None) -> None:
        key = self._key(labels)
        self.values[key] = self.values.get(key, 0.0) + amount

    def set(self, value: float, labels: dict[str, str] | None = None) -> None:
        self.values[self._key(labels)] = value

    def get(self, labels: dict[str, str] | None = None) -> float:
        return self.values.get(self._key(labels), 0.0)

    def observe(self, value: float, labels: dict[str, str] | None = None) -> None:
        key = self._key(labels)
        row = self.hist.setdefault(key, [0.0] * (len(self.buckets) + 2))
        row[bisect.bisect_left(self.buckets, value)] += 1  # per-bucket; cumulated when written
        row[-2] += value
        row[-1] += 1

    def render(self) -> list[str]:
        # prometheus_client (vLLM's exporter) names a counter's HELP/TYPE with the _total suffix.
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]
        if self.kind != "histogram":
            for key, value in self.values.items():
                lines.append(f"{self.name}{_labels(key)} {_num(value)}")
            return lines
        for key, row in self.hist.items():
            running = 0.0
            for bound, count in zip((*self.buckets, float("inf")), row, strict=False):
                running += count
                le = (*key, ("le", _num(bound)))
                lines.append(f"{self.name}_bucket{_labels(le)} {_num(running)}")
            lines.append(f"{self.name}_count{_labels(key)} {_num(row[-1])}")
            lines.append(f"{self.name}_sum{_labels(key)} {_num(row[-2])}")
        return lines


class EngineMetrics:
    """The engine's metric families, pre-populated so that every series exists from the start."""

    def __init__(self, model_name: str, *, spec_decode: bool) -> None:
        base: LabelKey = (("engine", "0"), ("model_name", model_name))
        self.base = base
        self.families: list[Metric] = []

        def add(name: str, kind: str, help_: str, buckets: tuple[float, ...] = ()) -> Metric:
            metric = Metric(name, help_, kind, base, buckets)
            self.families.append(metric)
            return metric

        self.running = add(
            "vllm:num_requests_running", "gauge", "Number of requests in model execution batches."
        )
        self.waiting = add(
            "vllm:num_requests_waiting", "gauge", "Number of requests waiting to be processed."
        )
        self.kv_usage = add(
            "vllm:kv_cache_usage_perc", "gauge", "KV-cache usage. 1 means 100 percent usage."
        )
        self.sleep_state = add(
            "vllm:engine_sleep_state",
            "gauge",
            "Engine sleep state; awake = 0 means engine is sleeping; "
            "awake = 1 means engine is awake; weights_offloaded = 1 means "
            "sleep level 1; discard_all = 1 means sleep level 2.",
        )
        self.preemptions = add(
            "vllm:num_preemptions_total",
            "counter",
            "Cumulative number of preemption from the engine.",
        )
        self.prompt_tokens = add(
            "vllm:prompt_tokens_total", "counter", "Number of prefill tokens processed."
        )
        self.generation_tokens = add(
            "vllm:generation_tokens_total", "counter", "Number of generation tokens processed."
        )
        self.prefix_queries = add(
            "vllm:prefix_cache_queries_total",
            "counter",
            "Prefix cache queries, in terms of number of queried tokens.",
        )
        self.prefix_hits = add(
            "vllm:prefix_cache_hits_total",
            "counter",
            "Prefix cache hits, in terms of number of cached tokens.",
        )
        self.success = add(
            "vllm:request_success_total", "counter", "Count of successfully processed requests."
        )
        self.ttft = add(
            "vllm:time_to_first_token_seconds",
            "histogram",
            "Histogram of time to first token in seconds.",
            TTFT_BUCKETS,
        )
        self.itl = add(
            "vllm:inter_token_latency_seconds",
            "histogram",
            "Histogram of inter-token latency in seconds.",
            ITL_BUCKETS,
        )
        self.tpot = add(
            "vllm:request_time_per_output_token_seconds",
            "histogram",
            "Histogram of time_per_output_token_seconds per request.",
            ITL_BUCKETS,
        )
        self.e2e = add(
            "vllm:e2e_request_latency_seconds",
            "histogram",
            "Histogram of e2e request latency in seconds.",
            E2E_BUCKETS,
        )
        self.queue_time = add(
            "vllm:request_queue_time_seconds",
            "histogram",
            "Histogram of time spent in WAITING phase for request.",
            E2E_BUCKETS,
        )
        self.request_prompt = add(
            "vllm:request_prompt_tokens",
            "histogram",
            "Number of prefill tokens processed.",
            TOKEN_BUCKETS,
        )
        self.request_generation = add(
            "vllm:request_generation_tokens",
            "histogram",
            "Number of generation tokens processed.",
            TOKEN_BUCKETS,
        )
        self.spec_drafts: Metric | None = None
        self.spec_draft_tokens: Metric | None = None
        self.spec_accepted: Metric | None = None
        if spec_decode:
            self.spec_drafts = add(
                "vllm:spec_decode_num_drafts_total", "counter", "Number of spec decoding drafts."
            )
            self.spec_draft_tokens = add(
                "vllm:spec_decode_num_draft_tokens_total", "counter", "Number of draft tokens."
            )
            self.spec_accepted = add(
                "vllm:spec_decode_num_accepted_tokens_total",
                "counter",
                "Number of accepted tokens.",
            )
        for metric in self.families:
            if metric.kind == "histogram":
                metric.hist[base] = [0.0] * (len(metric.buckets) + 2)
            elif metric is not self.success and metric is not self.sleep_state:
                metric.set(0.0)  # sleep state: only its three labelled series (real 0.23 on GPU)
        for reason in ("stop", "length", "abort", "error"):
            self.success.set(0.0, {"finished_reason": reason})
        self.set_sleep(0)

    def set_sleep(self, level: int) -> None:
        states = {"awake": 0, "weights_offloaded": 1, "discard_all": 2}
        for name, state_level in states.items():
            self.sleep_state.set(1.0 if state_level == level else 0.0, {"sleep_state": name})

    def render(self) -> str:
        lines: list[str] = []
        for metric in self.families:
            lines.extend(metric.render())
        return "\n".join(lines) + "\n"
