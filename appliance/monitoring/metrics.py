"""The engine's Prometheus `/metrics`, scraped while it is ready, turned into typed numbers.

Metric names are vLLM's (V1 engine, see reference/vllm.md §Prometheus metrics). Rates (tokens/s)
come from the difference between two scrapes of the `_total` counters; the prefix-cache hit rate,
the speculative-decoding acceptance and the time-to-first-token median are since the engine
started (what the counters and the histogram hold). A metric the engine does not export is None.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import httpx
from prometheus_client.parser import text_string_to_metric_families

from appliance import endpoint
from appliance.errors import EngineError

RUNNING = "vllm:num_requests_running"
WAITING = "vllm:num_requests_waiting"
KV_USAGE = "vllm:kv_cache_usage_perc"
PROMPT_TOKENS = "vllm:prompt_tokens_total"
GENERATION_TOKENS = "vllm:generation_tokens_total"
PREFIX_QUERIES = "vllm:prefix_cache_queries_total"
PREFIX_HITS = "vllm:prefix_cache_hits_total"
SPEC_DRAFTS = "vllm:spec_decode_num_drafts_total"
SPEC_DRAFT_TOKENS = "vllm:spec_decode_num_draft_tokens_total"
SPEC_ACCEPTED = "vllm:spec_decode_num_accepted_tokens_total"
TTFT = "vllm:time_to_first_token_seconds"
SLEEP_STATE = "vllm:engine_sleep_state"


@dataclass(frozen=True)
class EngineMetrics:
    """One scrape of the engine, with rates against the scrape before it."""

    at: float
    running: int | None = None
    waiting: int | None = None
    kv_cache_usage_pct: float | None = None  # 0-100
    prompt_tokens_total: float | None = None
    generation_tokens_total: float | None = None
    prompt_tokens_per_s: float | None = None
    generation_tokens_per_s: float | None = None
    prefix_cache_hit_pct: float | None = None  # since the engine started
    spec_acceptance_pct: float | None = None  # accepted / draft tokens, since start
    spec_mean_acceptance_length: float | None = None  # 1 + accepted / drafts
    ttft_median_s: float | None = None  # since start, interpolated within histogram buckets
    sleep_state: str | None = None  # awake | weights_offloaded | discard_all

    def to_dict(self) -> dict[str, float | int | str | None]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


Samples = dict[str, list[tuple[dict[str, str], float]]]


@dataclass
class ParsedMetrics:
    """Every sample of one scrape: name -> [(labels, value)]."""

    samples: Samples = field(default_factory=dict)

    def total(self, name: str) -> float | None:
        """Sum over every label set (one per engine / model), None when absent."""
        values = [v for _, v in self.samples.get(name, []) if not math.isnan(v)]
        return sum(values) if values else None

    def mean(self, name: str) -> float | None:
        values = [v for _, v in self.samples.get(name, []) if not math.isnan(v)]
        return sum(values) / len(values) if values else None


# The metric families read here (a family's samples add `_total`, `_bucket`, `_sum`, ...).
FAMILIES: tuple[str, ...] = tuple(
    name.removesuffix("_total")
    for name in (
        RUNNING,
        WAITING,
        KV_USAGE,
        PROMPT_TOKENS,
        GENERATION_TOKENS,
        PREFIX_QUERIES,
        PREFIX_HITS,
        SPEC_DRAFTS,
        SPEC_DRAFT_TOKENS,
        SPEC_ACCEPTED,
        TTFT,
        SLEEP_STATE,
    )
)


def _metric_name(line: str) -> str:
    if line.startswith("#"):
        parts = line.split(None, 3)
        return parts[2] if len(parts) > 2 and parts[1] in ("HELP", "TYPE") else ""
    return line.split("{", 1)[0].split(None, 1)[0] if line.strip() else ""


_WANTED = frozenset(FAMILIES)
_SUFFIXES = ("_total", "_bucket", "_sum", "_count", "_created")


# The time-to-first-token histogram is most of the lines read (one per bucket); it changes only
# when a request gets its first token, so the scraper parses it only when the token counters moved.
_TTFT_ONLY = frozenset({TTFT})
_ALL_BUT_TTFT = _WANTED - _TTFT_ONLY


def _wanted(name: str, wanted: frozenset[str] = _WANTED) -> bool:
    if name in wanted:
        return True
    return any(name.endswith(x) and name[: -len(x)] in wanted for x in _SUFFIXES)


def relevant_text(text: str, wanted: frozenset[str] = _WANTED) -> str:
    """Only the lines of the families read here: vLLM exports hundreds of lines (histograms of
    every latency) and parsing them all would cost most of the sampler's budget."""
    lines = (line for line in text.splitlines() if _wanted(_metric_name(line), wanted))
    return "\n".join(lines) + "\n"


def parse_metrics(text: str, wanted: frozenset[str] = _WANTED) -> ParsedMetrics:
    """Parse Prometheus text exposition (the families read here) with prometheus_client."""
    parsed = ParsedMetrics()
    for family in text_string_to_metric_families(relevant_text(text, wanted)):
        for sample in family.samples:
            parsed.samples.setdefault(sample.name, []).append((dict(sample.labels), sample.value))
    return parsed


def histogram_quantile(buckets: Iterable[tuple[float, float]], quantile: float) -> float | None:
    """Prometheus-style quantile from cumulative `(upper_bound, count)` buckets.

    Linear interpolation inside the bucket holding the rank; a rank in the +Inf bucket gives the
    largest finite bound (as Prometheus does). None when the histogram is empty.
    """
    ordered = sorted(buckets)
    if not ordered or ordered[-1][1] <= 0:
        return None
    rank = quantile * ordered[-1][1]
    lower, below = 0.0, 0.0
    for bound, count in ordered:
        if count >= rank:
            if math.isinf(bound):
                return lower
            if count == below:
                return bound
            return lower + (bound - lower) * (rank - below) / (count - below)
        lower, below = bound, count
    return lower


def _histogram_buckets(parsed: ParsedMetrics, name: str) -> list[tuple[float, float]]:
    summed: dict[float, float] = defaultdict(float)
    for labels, value in parsed.samples.get(f"{name}_bucket", []):
        summed[float(labels.get("le", "+Inf"))] += value
    return sorted(summed.items())


def _sleep_state(parsed: ParsedMetrics) -> str | None:
    for labels, value in parsed.samples.get(SLEEP_STATE, []):
        if value >= 1 and "sleep_state" in labels:
            return labels["sleep_state"]
    return None


def _ratio_pct(part: float | None, whole: float | None) -> float | None:
    if part is None or not whole:
        return None
    return 100.0 * part / whole


def _rate(now: float | None, before: float | None, seconds: float) -> float | None:
    if now is None or before is None or seconds <= 0:
        return None
    # A counter that went down means the engine restarted: no rate for this interval.
    return (now - before) / seconds if now >= before else None


def summarize(
    parsed: ParsedMetrics, at: float, previous: tuple[float, ParsedMetrics] | None = None
) -> EngineMetrics:
    """Typed engine numbers from one scrape (and the scrape before it, for rates)."""
    prompt = parsed.total(PROMPT_TOKENS)
    generation = parsed.total(GENERATION_TOKENS)
    prompt_rate = generation_rate = None
    if previous is not None:
        before_at, before = previous
        prompt_rate = _rate(prompt, before.total(PROMPT_TOKENS), at - before_at)
        generation_rate = _rate(generation, before.total(GENERATION_TOKENS), at - before_at)
    kv = parsed.mean(KV_USAGE)
    running = parsed.total(RUNNING)
    waiting = parsed.total(WAITING)
    drafts = parsed.total(SPEC_DRAFTS)
    accepted = parsed.total(SPEC_ACCEPTED)
    return EngineMetrics(
        at=at,
        running=int(running) if running is not None else None,
        waiting=int(waiting) if waiting is not None else None,
        kv_cache_usage_pct=100.0 * kv if kv is not None else None,
        prompt_tokens_total=prompt,
        generation_tokens_total=generation,
        prompt_tokens_per_s=prompt_rate,
        generation_tokens_per_s=generation_rate,
        prefix_cache_hit_pct=_ratio_pct(parsed.total(PREFIX_HITS), parsed.total(PREFIX_QUERIES)),
        spec_acceptance_pct=_ratio_pct(accepted, parsed.total(SPEC_DRAFT_TOKENS)),
        spec_mean_acceptance_length=(
            1.0 + accepted / drafts if accepted is not None and drafts else None
        ),
        ttft_median_s=histogram_quantile(_histogram_buckets(parsed, TTFT), 0.5),
        sleep_state=_sleep_state(parsed),
    )


class MetricsScraper:
    """Scrapes one engine's `/metrics`; keeps the previous scrape to turn counters into rates."""

    def __init__(
        self,
        client: httpx.Client | None = None,
        *,
        timeout_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._client = client  # None: endpoint's pooled client (a socket or TCP engine alike)
        self._timeout_s = timeout_s
        self._clock = clock
        self._previous: tuple[str, float, ParsedMetrics] | None = None
        # (engine URL, prompt and generation token totals) -> the TTFT histogram's samples
        self._ttft: tuple[tuple[str, float | None, float | None], Samples] | None = None

    def scrape(self, engine_url: str) -> EngineMetrics:
        """GET `{engine_url}/metrics`; raises EngineError when the engine does not answer."""
        base = engine_url.rstrip("/")
        url = base + "/metrics"
        try:
            if self._client is not None:
                response = self._client.get(url)
            else:
                response = endpoint.request("GET", url, self._timeout_s)
            response.raise_for_status()
            parsed = parse_metrics(response.text, _ALL_BUT_TTFT)
            key = (base, parsed.total(PROMPT_TOKENS), parsed.total(GENERATION_TOKENS))
            if self._ttft is None or self._ttft[0] != key:  # a token since: a first one maybe
                self._ttft = (key, parse_metrics(response.text, _TTFT_ONLY).samples)
            parsed.samples.update(self._ttft[1])
        except (httpx.HTTPError, ValueError) as err:
            self._previous = self._ttft = None
            raise EngineError(
                f"The engine's metrics at {endpoint.describe(url)} could not be read ({err}).",
                hint="The dashboard shows engine numbers again once the engine answers.",
            ) from err
        at = self._clock()
        previous = None
        if self._previous is not None and self._previous[0] == base:
            previous = self._previous[1:]
        self._previous = (base, at, parsed)
        return summarize(parsed, at, previous)

    def reset(self) -> None:
        """Forget the previous scrape (the engine stopped): the next rate starts afresh."""
        self._previous = self._ttft = None

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
