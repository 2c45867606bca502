"""vLLM's startup log lines -> start-up phases, effective settings and recognised failures.

Pure: `parse_line()` reads one line, `PhaseTracker` keeps the phases in order with their times.
The lines are those listed in reference/vllm.md §startup; tqdm bars arrive `\r`-separated and the
runtimes split them into lines before they reach this module.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from appliance.engine.state import PhaseRecord

LAUNCHING = "Starting container"
INITIALIZING = "Initializing engine"
LOADING_WEIGHTS = "Loading weights"
COMPILING = "Compiling"
KV_CACHE = "Allocating KV cache"
CUDA_GRAPHS = "Capturing CUDA graphs"
API_SERVER = "Starting API server"

LOG_PHASES = (
    LAUNCHING,
    INITIALIZING,
    LOADING_WEIGHTS,
    COMPILING,
    KV_CACHE,
    CUDA_GRAPHS,
    API_SERVER,
)

# Failure kinds recognised in the log.
CUDA_OOM = "cuda_oom"
KV_NO_MEMORY = "kv_no_memory"
MAX_LEN_TOO_LARGE = "max_len_too_large"
CUDA_ERROR = "cuda_error"

_PHASE_PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = (
    (INITIALIZING, re.compile(r"vLLM API server version|Initializing a V1 LLM engine")),
    (INITIALIZING, re.compile(r"Resolved architecture")),
    (LOADING_WEIGHTS, re.compile(r"Starting to load model|Loading safetensors checkpoint shards")),
    (LOADING_WEIGHTS, re.compile(r"Loading weights took|Model loading took")),
    (COMPILING, re.compile(r"torch\.compile|Compiling a graph|Dynamo bytecode transform")),
    (KV_CACHE, re.compile(r"Available KV cache memory|GPU KV cache size|Maximum concurrency for")),
    (CUDA_GRAPHS, re.compile(r"Capturing CUDA graphs?|Graph capturing finished")),
    (API_SERVER, re.compile(r"Starting vLLM (API )?server|Route: /|Application startup complete")),
)

_FAILURES: tuple[tuple[str, re.Pattern[str]], ...] = (
    (CUDA_OOM, re.compile(r"CUDA out of memory|OutOfMemoryError")),
    (KV_NO_MEMORY, re.compile(r"No available memory for the cache blocks")),
    (
        MAX_LEN_TOO_LARGE,
        re.compile(
            r"larger than the maximum number of tokens that can be stored"
            r"|KV cache is needed, which is larger than the available KV cache memory"
        ),
    ),
    (CUDA_ERROR, re.compile(r"RuntimeError: .*CUDA error")),
)

_NUM = r"([\d,]+(?:\.\d+)?)"
_VERSION = re.compile(r"vLLM API server version ([\w.+\-]+)")
_ARCH = re.compile(r"Resolved architecture: (\S+)")
_SHARDS = re.compile(r"Loading safetensors checkpoint shards:\s*(\d+)%[^|]*\|\s*(\d+)/(\d+)")
_WEIGHTS_MEM = re.compile(r"Model loading took " + _NUM + r" GiB")
_WEIGHTS_TIME = re.compile(r"Loading weights took " + _NUM + r" seconds")
_COMPILE_TIME = re.compile(r"torch\.compile (?:took|takes) " + _NUM + r" s in total")
_KV_MEM = re.compile(r"Available KV cache memory: " + _NUM + r" GiB")
_KV_TOKENS = re.compile(r"GPU KV cache size: " + _NUM + r" tokens")
_MAX_CONC = re.compile(r"Maximum concurrency for " + _NUM + r" tokens per request: " + _NUM + "x")
_GRAPHS = re.compile(r"Capturing CUDA graphs? \(([^)]*)\):\s*(\d+)%[^|]*\|[^|]*\|\s*(\d+)/(\d+)")
_GRAPHS_DONE = re.compile(r"Graph capturing finished in " + _NUM + r" secs?, took " + _NUM)
_MODEL_MAX_LEN = re.compile(r"Using max model len (\d+)")
_ESTIMATED_LEN = re.compile(r"estimated maximum model length is (\d+)")
_SERVER_URL = re.compile(r"Starting vLLM (?:API )?server(?: \d+)? on (\S+)")


def _number(text: str) -> float:
    return float(text.replace(",", ""))


@dataclass
class LogEvent:
    """What one log line tells: a phase it belongs to, a detail, facts, a failure."""

    phase: str | None = None
    detail: str = ""
    facts: dict[str, Any] = field(default_factory=dict)
    failure: str | None = None


def _facts(line: str) -> tuple[dict[str, Any], str]:
    facts: dict[str, Any] = {}
    detail = ""
    if m := _VERSION.search(line):
        facts["vllm_version"] = m.group(1)
    if m := _ARCH.search(line):
        facts["architecture"] = m.group(1)
    if m := _SHARDS.search(line):
        detail = f"{m.group(2)}/{m.group(3)} shards"
    if m := _WEIGHTS_MEM.search(line):
        facts["weights_gib"] = _number(m.group(1))
    if m := _WEIGHTS_TIME.search(line):
        facts["weights_load_s"] = _number(m.group(1))
    if m := _COMPILE_TIME.search(line):
        facts["compile_s"] = _number(m.group(1))
    if m := _KV_MEM.search(line):
        facts["kv_cache_gib"] = _number(m.group(1))
    if m := _KV_TOKENS.search(line):
        facts["kv_cache_tokens"] = int(_number(m.group(1)))
    if m := _MAX_CONC.search(line):
        facts["max_model_len"] = int(_number(m.group(1)))
        facts["max_concurrency"] = _number(m.group(2))
    if m := _GRAPHS.search(line):
        detail = f"{m.group(1)} {m.group(3)}/{m.group(4)}"
    if m := _GRAPHS_DONE.search(line):
        facts["graph_capture_s"] = _number(m.group(1))
    if m := _MODEL_MAX_LEN.search(line):
        facts["model_max_len"] = int(m.group(1))
    if m := _ESTIMATED_LEN.search(line):
        facts["estimated_max_model_len"] = int(m.group(1))
    if m := _SERVER_URL.search(line):
        facts["server_url"] = m.group(1)
    return facts, detail


def parse_line(line: str) -> LogEvent | None:
    """Read one log line; None when it says nothing the appliance uses."""
    event = LogEvent()
    for phase, pattern in _PHASE_PATTERNS:
        if pattern.search(line):
            event.phase = phase
            break
    for kind, pattern in _FAILURES:
        if pattern.search(line):
            event.failure = kind
            break
    event.facts, event.detail = _facts(line)
    if event.phase is None and event.failure is None and not event.facts:
        return None
    return event


class PhaseTracker:
    """Phases in order with their times; later phases close earlier ones, never the reverse."""

    def __init__(self) -> None:
        self.phases: list[PhaseRecord] = []
        self.facts: dict[str, Any] = {}
        self.failure: str | None = None
        self.failure_line: str = ""

    @property
    def current(self) -> PhaseRecord | None:
        return self.phases[-1] if self.phases else None

    def begin(self, now: float) -> None:
        """The engine process was just launched: the first phase, before it logs anything."""
        if not self.phases:
            self.phases.append(PhaseRecord(name=LAUNCHING, started_at=now))

    def feed(self, line: str, now: float) -> bool:
        """Take one log line seen at wall time `now`; True when anything changed."""
        event = parse_line(line)
        if event is None:
            return False
        if event.failure and self.failure is None:
            self.failure = event.failure
            self.failure_line = line.strip()
        self.facts.update(event.facts)
        if event.phase is not None:
            self._advance(event.phase, now)
            current = self.current
            if event.detail and current is not None and current.name == event.phase:
                current.detail = event.detail
        return True

    def _advance(self, phase: str, now: float) -> None:
        index = LOG_PHASES.index(phase)
        current = self.current
        if current is not None and LOG_PHASES.index(current.name) >= index:
            return
        self.close(now)
        self.phases.append(PhaseRecord(name=phase, started_at=now))

    def close(self, now: float) -> None:
        """Mark the open phase done (a later phase began, or the engine became ready)."""
        current = self.current
        if current is not None and not current.done:
            current.elapsed_s = max(0.0, now - current.started_at)
            current.done = True
