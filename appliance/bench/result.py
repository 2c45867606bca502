"""Reading the result file `vllm bench serve --save-result` writes.

The file is one JSON object, written once after every request finished (a cancelled run writes
none). Keys as vLLM 0.32 writes them (`vllm/benchmarks/serve.py`, run against a fake server and
the CPU engine): counts (`completed`, `failed`, ...), throughputs (`request_throughput`,
`output_throughput`, ...), latency blocks `{mean,median,std,p<P>}_{ttft,tpot,itl,e2el}_ms`, and,
only in newer vLLM with speculative decoding and a readable `/metrics`, `spec_decode_*`.

A run where every request failed still exits 0 and writes `completed: 0`, so success is judged
from the counts, never from the exit status.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance.bench.errors import BenchFailedError, BenchResultError

COUNT_KEYS = ("completed", "failed")
THROUGHPUT_KEYS = ("duration", "request_throughput", "output_throughput")
LATENCY_METRICS = ("ttft", "tpot", "itl")
LATENCY_STATS = ("mean", "median", "p99")
LATENCY_KEYS = tuple(f"{s}_{m}_ms" for m in LATENCY_METRICS for s in LATENCY_STATS)
SPEC_DECODE_KEYS = (
    "spec_decode_acceptance_rate",
    "spec_decode_acceptance_length",
    "spec_decode_num_drafts",
    "spec_decode_draft_tokens",
    "spec_decode_accepted_tokens",
)


@dataclass(frozen=True)
class Latency:
    """One latency metric in milliseconds."""

    mean: float
    median: float
    p99: float


@dataclass(frozen=True)
class SpecDecode:
    """MTP (speculative decoding) acceptance over the run, as vLLM computed it from `/metrics`."""

    acceptance_rate: float  # percent of draft tokens accepted
    acceptance_length: float  # 1 + accepted / drafts
    num_drafts: int
    draft_tokens: int
    accepted_tokens: int
    per_position: tuple[float, ...]  # fractions, position 0 first


@dataclass(frozen=True)
class BenchResult:
    """The numbers a person compares, plus the file's own object untouched (`raw`)."""

    raw: Mapping[str, Any]
    completed: int
    failed: int
    duration: float
    request_throughput: float
    output_throughput: float
    # None when no request completed: vLLM may leave the latency keys out or write zeros.
    ttft: Latency | None
    tpot: Latency | None
    itl: Latency | None
    spec_decode: SpecDecode | None

    @property
    def succeeded(self) -> bool:
        return self.completed > 0 and self.failed == 0

    def require_success(self) -> BenchResult:
        """This result, or BenchFailedError saying how many requests failed."""
        if self.succeeded:
            return self
        total = self.completed + self.failed
        if self.completed == 0:
            raise BenchFailedError(
                f"The benchmark ran but all {total} requests failed.",
                hint="vLLM prints the first errors in the run's output; check the served model "
                "name and that the engine answers a chat.",
            )
        raise BenchFailedError(
            f"The benchmark ran but {self.failed} of {total} requests failed.",
            hint="Its numbers would not be comparable; see the run's output for the errors.",
        )


def _number(data: Mapping[str, Any], key: str, where: str) -> float:
    value = data.get(key)
    # bool is an int in Python; a JSON true is not a count.
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BenchResultError(
            f"{where} has no number for {key!r} (got {value!r}).",
            hint="It is not a `vllm bench serve --save-result` file, or its vLLM writes other "
            "keys; run `vllm bench serve --help` in the engine image.",
        )
    return float(value)


def _count(data: Mapping[str, Any], key: str, where: str) -> int:
    value = _number(data, key, where)
    if value < 0 or not value.is_integer():
        raise BenchResultError(f"{where} has {value!r} for {key!r}, not a count.")
    return int(value)


def _latency(data: Mapping[str, Any], metric: str, where: str) -> Latency:
    mean, median, p99 = (_number(data, f"{s}_{metric}_ms", where) for s in LATENCY_STATS)
    return Latency(mean=mean, median=median, p99=p99)


def _spec_decode(data: Mapping[str, Any], where: str) -> SpecDecode | None:
    if not any(key in data for key in SPEC_DECODE_KEYS):
        return None
    per_position = data.get("spec_decode_per_position_acceptance_rates", [])
    if not isinstance(per_position, list) or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in per_position
    ):
        raise BenchResultError(
            f"{where} has {per_position!r} for 'spec_decode_per_position_acceptance_rates', "
            "not a list of numbers."
        )
    return SpecDecode(
        acceptance_rate=_number(data, "spec_decode_acceptance_rate", where),
        acceptance_length=_number(data, "spec_decode_acceptance_length", where),
        num_drafts=_count(data, "spec_decode_num_drafts", where),
        draft_tokens=_count(data, "spec_decode_draft_tokens", where),
        accepted_tokens=_count(data, "spec_decode_accepted_tokens", where),
        per_position=tuple(float(v) for v in per_position),
    )


def parse_result(data: object, *, where: str = "The benchmark result") -> BenchResult:
    """A BenchResult from the decoded JSON of a result file; BenchResultError if it is not one."""
    if not isinstance(data, dict):
        raise BenchResultError(
            f"{where} is not a JSON object (got {type(data).__name__}).",
            hint="Expected the file `vllm bench serve --save-result` writes.",
        )
    completed = _count(data, "completed", where)
    failed = _count(data, "failed", where)
    duration, request_tp, output_tp = (_number(data, k, where) for k in THROUGHPUT_KEYS)
    latencies: dict[str, Latency | None] = {}
    for metric in LATENCY_METRICS:
        if completed == 0 and not all(f"{s}_{metric}_ms" in data for s in LATENCY_STATS):
            latencies[metric] = None
        else:
            latencies[metric] = _latency(data, metric, where)
    return BenchResult(
        raw=data,
        completed=completed,
        failed=failed,
        duration=duration,
        request_throughput=request_tp,
        output_throughput=output_tp,
        ttft=latencies["ttft"],
        tpot=latencies["tpot"],
        itl=latencies["itl"],
        spec_decode=_spec_decode(data, where),
    )


def load_result(path: Path) -> BenchResult:
    """Read and check one result file. A missing file means the run was stopped before the end
    (vLLM writes the file only after the last request)."""
    where = f"The benchmark result {path}"
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise BenchResultError(
            f"{where} does not exist: the run was stopped or crashed before it finished.",
            hint="vLLM writes the result only after the last request; see the run's output.",
        ) from None
    except (OSError, UnicodeDecodeError) as err:
        raise BenchResultError(f"{where} cannot be read ({err}).") from err
    try:
        data = json.loads(text)  # NaN/Infinity, which json.dump can write, load as floats
    except json.JSONDecodeError as err:
        raise BenchResultError(
            f"{where} is not valid JSON ({err}).",
            hint="The run may have been killed while writing it; run the benchmark again.",
        ) from err
    return parse_result(data, where=where)
