"""vLLM's startup log lines -> start-up phases, effective settings and recognised failures.

Pure: `parse_line()` reads one line, `PhaseTracker` keeps the phases in order with their times.
tqdm bars arrive `\\r`-separated and the runtimes split them into lines before they reach this
module; ANSI colour codes (the logo's, when the log goes to a terminal) are ignored.

Where each line comes from in vLLM's source (0.32.0 as installed by scripts/realvllm.sh; the GPU
lines of the 0.22/0.23 image from the same files, read with the `search` tool's code corpus):

- version: `vllm/entrypoints/serve/utils/api_utils.py` `log_version_and_model`: an ASCII logo whose
  lines end in `version X` and `model M`, or with VLLM_DISABLE_LOG_LOGO=1 (or no formatter)
  `vLLM server version X, serving model M`. There is no `vLLM API server version` line.
- weights: `model_executor/model_loader/default_loader.py` `Loading weights took %.2f seconds`;
  `v1/worker/gpu_model_runner.py` `Model loading took %s GiB memory and %.6f seconds`.
- compile: `compilation/monitor.py` `%storch.compile took %.2f s in total` (older: `takes`),
  `%sInitial profiling/warmup run took %.2f s`; `compilation/backends.py` `%sDynamo bytecode
  transform time: %.2f s`, `%sCompiling a graph for compile range %s takes %.2f s`;
  `compilation/decorators.py` `%ssaved AOT compiled function to %s`; the CPU runner
  (`v1/worker/cpu_model_runner.py`) `Warming up model for the compilation...`, `Warming up done.`
- KV cache: `v1/worker/gpu_worker.py` `Available KV cache memory: %s GiB`; `v1/worker/
  cpu_worker.py` `Auto set (%s/%s) GiB for KV cache on node N, ...` / `Explicitly set (...)`;
  `v1/core/kv_cache_utils.py` `%s KV cache size: %s tokens, Maximum concurrency for %s tokens per
  request: %.2fx` on one line (`GPU` or `CPU`; older releases log `GPU KV cache size: %s tokens`
  and `Maximum concurrency for ...` as two lines).
- CUDA graphs: `v1/worker/gpu_model_runner.py` tqdm `Capturing CUDA graphs ({mode}, {type})` and
  `Graph capturing finished in %.0f secs, took %.2f GiB` (none on CPU).
- `v1/engine/core.py` `init engine (profile, create kv cache, warmup model) took %.2f s[econds]`.
- failures: `v1/worker/utils.py` `Free memory on device D (F/T GiB) on startup is less than
  desired GPU memory utilization (U, R GiB)`; `v1/worker/cpu_worker.py` `Available memory on node
  N (...) on startup is less than desired CPU memory utilization (...)` and `... on kv cache
  allocation is less than requested memory for kv`; `v1/engine/utils.py` `RuntimeError: Engine
  core initialization failed. See root cause above. Failed core proc(s): {...}`;
  `config/model.py` `Sleep mode is not supported on current platform.` (a pydantic
  `ValidationError`); argparse's `vllm: error: unrecognized arguments: X` (exit 2);
  `v1/engine/core_client.py` `[shutdown] MPClient: engine core exited unexpectedly; starting
  cleanup` when the engine core dies while serving (the API server then exits 0).
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
MEMORY_IN_USE = "memory_in_use"  # the start-up free-memory check: another process holds memory
CONFIG_INVALID = "config_invalid"  # vLLM refused the configuration (a pydantic ValidationError)
UNKNOWN_ARGUMENT = "unknown_argument"  # argparse: the image's vLLM does not know a flag (exit 2)
BAD_ARGUMENT = "bad_argument"  # argparse: a flag's value is invalid (exit 2)
NOT_SUPPORTED = "not_supported"  # a setting this hardware or vLLM build cannot do
# vLLM could not bind its socket (`--uds`: a file is already at the path) or port: the appliance
# checks both first (endpoint.prepare_socket, health.ensure_port_free), so only a race gets here
ADDRESS_IN_USE = "address_in_use"
ENGINE_INIT_FAILED = "engine_init_failed"  # generic: the root cause, if any, is above it
ENGINE_DIED = "engine_died"  # generic: the engine core (or its worker) process went away

# A failure the supervisor may answer with one safer retry (spec.safer_spec: a lower
# --gpu-memory-utilization, or a shorter --max-model-len when the context did not fit).
# KV_NO_MEMORY is not: its cure is more memory for the engine, a lower utilization makes it worse.
RETRYABLE_FAILURES = frozenset({CUDA_OOM, MAX_LEN_TOO_LARGE, MEMORY_IN_USE})

_MEMORY_HINT = (
    "Free GPU memory used by other programs, lower engine.max_model_len or "
    "engine.gpu_memory_utilization, or pick a smaller profile (`step-station plan`)."
)
# What to do, per failure kind: the sentence after the reason in the failure message.
FAILURE_HINTS: dict[str, str] = {
    CUDA_OOM: _MEMORY_HINT,
    KV_NO_MEMORY: _MEMORY_HINT,
    MAX_LEN_TOO_LARGE: "Lower engine.max_model_len "
    "(`step-station config set engine.max_model_len N`).",
    MEMORY_IN_USE: "Another program holds memory the engine needs: stop it (`nvidia-smi` lists "
    "GPU processes), or lower engine.gpu_memory_utilization "
    "(`step-station config set engine.gpu_memory_utilization 0.85`).",
    CUDA_ERROR: "A CUDA error stopped the engine: check `nvidia-smi` and the driver, then start "
    "again; if it repeats, restart the machine.",
    CONFIG_INVALID: "vLLM refused the settings (its reason is in the log line): change the "
    "setting it names (`step-station config show`), then start again.",
    UNKNOWN_ARGUMENT: "The image's vLLM does not know this flag: pick an image that has it "
    "(engine.image) or a profile without it, then start again.",
    BAD_ARGUMENT: "vLLM refused a flag's value (named in the log line): fix the setting that "
    "sets it, then start again.",
    NOT_SUPPORTED: "This machine or this vLLM build cannot do a setting named in the log line "
    "(e.g. an FP8 KV cache needs hardware support): change that setting or pick another "
    "profile, then start again.",
    ADDRESS_IN_USE: "Another program took the engine's address (its socket, or engine.port "
    "with engine.listen = tcp) as it started: stop that program (`step-station stop` for "
    "another engine of this name), then start again.",
    ENGINE_DIED: "The engine's core process died (killed from outside, or a crash: the log "
    "lines before it say which); start the engine again.",
    ENGINE_INIT_FAILED: "The engine could not start; the lines above it in the log say why "
    "(`step-station logs`). Fix that, then start again.",
}

_PHASE_PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = (
    (
        INITIALIZING,
        re.compile(
            r"vLLM server version |█.*\s(?:version|model)\s+\S"
            r"|non-default args: |Initializing a V1 LLM engine|Resolved architecture"
            r"|[Mm]ulti-modal warmup completed in"
        ),
    ),
    (
        LOADING_WEIGHTS,
        re.compile(
            r"Starting to load model|Loading safetensors checkpoint shards|Initializing model took"
        ),
    ),
    (LOADING_WEIGHTS, re.compile(r"Loading weights took|Model loading took")),
    (
        COMPILING,
        re.compile(
            r"torch\.compile (?:took|takes)|Compiling a graph for|Dynamo bytecode transform"
            r"|Warming up model for the compilation|saved AOT compiled function"
            r"|Initial profiling/warmup run took|Warming up done\."
            r"|Directly load the compiled graph|Cache the graph .* for later use"
            r"|Starting torch\.compile|for vLLM's torch\.compile$|torch\.compile cache is disabled"
            r"|Compiling model again due to"
        ),
    ),
    (
        KV_CACHE,
        re.compile(
            r"Available KV cache memory|\w+ KV cache size: [\d,]+ tokens|Maximum concurrency for"
            r"|CUDA graph memory profiling is (?:enabled|disabled)"
            r"|\) GiB for KV cache on node"
        ),
    ),
    (
        CUDA_GRAPHS,
        re.compile(r"Capturing CUDA graphs?|Graph capturing finished|CUDA graph pool memory: "),
    ),
    (
        API_SERVER,
        re.compile(
            r"Supported[_ ]tasks: \[|Starting vLLM (API )?server|Route: /"
            r"|Application startup complete"
        ),
    ),
)

_FAILURES: tuple[tuple[str, re.Pattern[str]], ...] = (
    (
        CUDA_OOM,
        re.compile(
            r"CUDA out of memory|OutOfMemoryError|AcceleratorError: CUDA error: out of memory"
        ),
    ),
    (KV_NO_MEMORY, re.compile(r"No available memory for the cache blocks")),
    (
        MAX_LEN_TOO_LARGE,
        re.compile(
            r"larger than the maximum number of tokens that can be stored"
            r"|KV cache is needed, which is larger than the available KV cache memory"
        ),
    ),
    (
        MEMORY_IN_USE,
        re.compile(
            r"Free memory on device .* is less than (?:desired GPU memory utilization"
            r"|the engine's budget)"
            r"|Available memory on node .* is less than (?:desired CPU memory utilization"
            r"|requested memory for kv)"
        ),
    ),
    (CUDA_ERROR, re.compile(r"AcceleratorError|(?:RuntimeError|Exception): .*CUDA error")),
    (CONFIG_INVALID, re.compile(r"ValidationError: \d+ validation errors? for ")),
    (UNKNOWN_ARGUMENT, re.compile(r"^\S*vllm(?: \w+)?: error: unrecognized arguments: ")),
    (BAD_ARGUMENT, re.compile(r"^\S*vllm(?: \w+)?: error: argument ")),
    (NOT_SUPPORTED, re.compile(r"NotImplementedError: \S")),
    (ADDRESS_IN_USE, re.compile(r"OSError: \[Errno 98\] Address already in use")),
    (
        ENGINE_DIED,
        re.compile(
            r"engine core exited unexpectedly|Engine core process \S+ died unexpectedly"
            r"|Worker proc \S+ died unexpectedly|RuntimeError: Process \S+ \(PID: \d+\) died"
        ),
    ),
    (
        ENGINE_INIT_FAILED,
        re.compile(
            r"Worker failed with error '"
            r"|Engine core initialization failed|EngineCore failed to start\."
            r"|WorkerProc failed to start\.|WorkerProc initialization failed"
        ),
    ),
)
# A generic failure gives way to a specific one logged after it (the processes' lines interleave).
_GENERIC_FAILURES = (ENGINE_INIT_FAILED, ENGINE_DIED)

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_NUM = r"([\d,]+(?:\.\d+)?)"
_VERSION = re.compile(
    r"vLLM server version ([\w.+\-]+), serving model |█.*\sversion\s+([\w.+\-]+)\s*$"
)
_ENGINE_VERSION = re.compile(r"Initializing a V1 LLM engine \(v([\w.+\-]+)\)")
_ARCH = re.compile(r"Resolved architecture: (\S+)")
_SHARDS = re.compile(r"Loading safetensors checkpoint shards:\s*(\d+)%[^|]*\|\s*(\d+)/(\d+)")
_WEIGHTS_MEM = re.compile(r"Model loading took " + _NUM + r" GiB")
_WEIGHTS_TIME = re.compile(r"Loading weights took " + _NUM + r" seconds")
_COMPILE_TIME = re.compile(r"torch\.compile (?:took|takes) " + _NUM + r" s in total")
_KV_MEM = re.compile(r"Available KV cache memory: " + _NUM + r" GiB")
_KV_MEM_CPU = re.compile(r"(?:Auto|Explicitly) set \(" + _NUM + r"/[\d.,]+\) GiB for KV cache")
_KV_TOKENS = re.compile(r"\b\w+ KV cache size: " + _NUM + r" tokens")
_MAX_CONC = re.compile(r"Maximum concurrency for " + _NUM + r" tokens per request: " + _NUM + "x")
_GRAPHS = re.compile(r"Capturing CUDA graphs? \(([^)]*)\):\s*(\d+)%[^|]*\|[^|]*\|\s*(\d+)/(\d+)")
_GRAPHS_DONE = re.compile(r"Graph capturing finished in " + _NUM + r" secs?, took " + _NUM)
_INIT_ENGINE = re.compile(r"init engine \(profile, create kv cache, warmup model\) took " + _NUM)
_MODEL_MAX_LEN = re.compile(r"Using max model len (\d+)")
_ESTIMATED_LEN = re.compile(r"estimated maximum model length is (\d+)")
_SERVER_URL = re.compile(r"Starting vLLM (?:API )?server(?: \d+)? on (\S+)")
_UNKNOWN_ARGS = re.compile(r"error: unrecognized arguments: (.+?)\s*$")
_VALUE_ERROR = re.compile(r"^\s*Value error, (.+?)(?: \[type=.*)?$")


def _number(text: str) -> float:
    return float(text.replace(",", ""))


@dataclass
class LogEvent:
    """What one log line tells: a phase it belongs to, a detail, facts, a failure."""

    phase: str | None = None
    detail: str = ""
    facts: dict[str, Any] = field(default_factory=dict)
    failure: str | None = None


def _facts(line: str) -> tuple[dict[str, Any], str]:  # noqa: C901 - one test per log pattern
    facts: dict[str, Any] = {}
    detail = ""
    if m := _VERSION.search(line):
        facts["vllm_version"] = m.group(1) or m.group(2)
    if m := _ENGINE_VERSION.search(line):
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
    if m := _KV_MEM.search(line) or _KV_MEM_CPU.search(line):
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
    if m := _INIT_ENGINE.search(line):
        facts["engine_init_s"] = _number(m.group(1))
    if m := _MODEL_MAX_LEN.search(line):
        facts["model_max_len"] = int(m.group(1))
    if m := _ESTIMATED_LEN.search(line):
        facts["estimated_max_model_len"] = int(m.group(1))
    if m := _SERVER_URL.search(line):
        facts["server_url"] = m.group(1)
    if m := _UNKNOWN_ARGS.search(line):
        facts["unknown_arguments"] = m.group(1)
    if m := _VALUE_ERROR.search(line):
        facts["config_error"] = m.group(1)
    return facts, detail


def parse_line(line: str) -> LogEvent | None:
    """Read one log line; None when it says nothing the appliance uses."""
    line = _ANSI.sub("", line)
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


def is_retryable(failure: str | None) -> bool:
    """Whether a start that failed this way may be retried once with safer settings."""
    return failure in RETRYABLE_FAILURES


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
        self._note_failure(event, _ANSI.sub("", line).strip())
        self.facts.update(event.facts)
        if event.phase is not None:
            self._advance(event.phase, now)
            current = self.current
            if event.detail and current is not None and current.name == event.phase:
                current.detail = event.detail
        return True

    def _note_failure(self, event: LogEvent, line: str) -> None:
        if event.failure and (
            self.failure is None
            or (self.failure in _GENERIC_FAILURES and event.failure not in _GENERIC_FAILURES)
        ):
            self.failure = event.failure
            self.failure_line = line
        elif "config_error" in event.facts and self.failure == CONFIG_INVALID:
            # pydantic prints "ValidationError: 1 validation error for X" and the reason below it
            self.failure_line = f"Value error, {event.facts['config_error']}"

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
