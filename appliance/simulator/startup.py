"""vLLM's startup sequence: log lines in order, tqdm bars, load time, start-up faults.

The load time (`STEP_SIM_LOAD_S`) is spread over the phases as on a real start: weights about
half, compile a fifth, KV-cache profiling, CUDA-graph capture, then the API server. Durations in
the log lines are the real elapsed times; memory figures come from `memory.py`.

The lines are vLLM's own format strings for a GPU start (vllm/entrypoints/serve/utils/api_utils.py
logo, model_executor/model_loader/default_loader.py, compilation/monitor.py and backends.py,
v1/worker/gpu_worker.py, v1/core/kv_cache_utils.py, v1/worker/gpu_model_runner.py,
v1/engine/core.py; tests/data/vllm_logs/README.md lists them). The version comes as vLLM's ASCII
logo, or as one line with VLLM_DISABLE_LOG_LOGO=1, never as `vLLM API server version`.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import NoReturn

from appliance.simulator import VLLM_VERSION
from appliance.simulator.args import ServeArgs
from appliance.simulator.knobs import Knobs
from appliance.simulator.logs import CORE, VllmLog, tqdm_bar
from appliance.simulator.memory import (
    NATIVE_MAX_MODEL_LEN,
    MemoryPlan,
    StartupError,
    oom_text,
    plan_memory,
    weights,
)

SHARE = {"weights": 0.5, "compile": 0.2, "profile": 0.05, "graphs": 0.15, "api": 0.1}
GRAPH_PASSES = (("mixed prefill-decode, PIECEWISE", 51), ("decode, FULL", 35))


class EngineFailedError(Exception):
    """Start-up failed the way vLLM fails: the text is printed, the process exits 1."""


class Startup:
    def __init__(self, args: ServeArgs, knobs: Knobs, log: VllmLog) -> None:
        self.args = args
        self.knobs = knobs
        self.log = log
        self.t0 = time.monotonic()
        self.hang_at: float | None = None
        self.failure: StartupError | None = None
        if knobs.fault == "hang":
            after = knobs.fault_after_s
            self.hang_at = after if after is not None else knobs.load_s * SHARE["weights"] / 2

    async def pause(self, seconds: float) -> None:
        """Sleep through part of the load; with STEP_SIM_FAULT=hang, never come back once due."""
        if self.hang_at is not None:
            elapsed = time.monotonic() - self.t0
            if elapsed + seconds >= self.hang_at:
                await asyncio.sleep(max(0.0, self.hang_at - elapsed))
                await asyncio.Event().wait()  # hung: only a signal ends the process
        await asyncio.sleep(seconds)

    async def run(self) -> MemoryPlan:
        args, log = self.args, self.log
        self._version()
        log.info(f"non-default args: {args.non_default}", "api_utils.py:286")
        try:
            plan = plan_memory(args, self.knobs)
        except StartupError as err:
            if err.phase == "config":
                self._fail_config(str(err))
            self.failure = err
            plan = _fallback_plan(args, self.knobs)
        log.info(f"Resolved architecture: {plan.architecture}", "model.py:733")
        log.info(f"Using max model len {plan.max_model_len}", "model.py:2152")
        log.info("Chunked prefill is enabled with max_num_batched_tokens=8192.", "scheduler.py:205")
        log.info(
            f"Initializing a V1 LLM engine (v{VLLM_VERSION}) with config: "
            + self._config_text(plan),
            "core.py:93",
            CORE,
        )
        await self._load_weights(plan)
        compile_s = await self._compile()
        await self._profile(plan)
        await self._graphs()
        log.info(
            "init engine (profile, create kv cache, warmup model) took "
            f"{time.monotonic() - self.t0:.2f} s (compilation: {compile_s:.2f} s)",
            "core.py:396",
            CORE,
        )
        await self.pause(self.knobs.load_s * SHARE["api"] / 2)
        log.info("Supported_tasks: ['generate']", "api_server.py:1611")
        return plan

    def _version(self) -> None:
        """vLLM's logo with the version and model, or one line with VLLM_DISABLE_LOG_LOGO=1."""
        where, model = "api_utils.py:347", self.args.model
        if os.environ.get("VLLM_DISABLE_LOG_LOGO", "0") not in ("", "0"):
            self.log.info(f"vLLM server version {VLLM_VERSION}, serving model {model}", where)
            return
        for line in (
            "",
            "       █     █     █▄   ▄█",
            f" ▄▄ ▄█ █     █     █ ▀▄▀ █  version {VLLM_VERSION}",
            f"  █▄█▀ █     █     █     █  model   {model}",
            "   ▀▀  ▀▀▀▀▀ ▀▀▀▀▀ ▀     ▀",
            "",
        ):
            self.log.info(line, where)

    def _config_text(self, plan: MemoryPlan) -> str:
        a = self.args
        quant = a.quantization or ("fp8" if "fp8" in a.model.lower() else None)
        return (
            f"model='{a.model}', speculative_config={a.speculative_config}, tokenizer='{a.model}', "
            "skip_tokenizer_init=False, tokenizer_mode=auto, revision=None, "
            f"trust_remote_code={a.non_default.get('trust_remote_code', False)}, "
            f"dtype=torch.bfloat16, max_seq_len={plan.max_model_len}, download_dir=None, "
            f"load_format=auto, tensor_parallel_size={a.tensor_parallel_size}, "
            "pipeline_parallel_size=1, data_parallel_size=1, disable_custom_all_reduce=False, "
            f"quantization={quant}, enforce_eager=False, kv_cache_dtype={a.kv_cache_dtype}, "
            "device_config=cuda, seed=0, "
            f"served_model_name={a.served_name}, enable_prefix_caching=True, "
            "enable_chunked_prefill=True, pooler_config=None"
        )

    async def _load_weights(self, plan: MemoryPlan) -> None:
        log = self.log
        log.info(f"Starting to load model {self.args.model}...", "gpu_model_runner.py:5040", CORE)
        log.info(
            "Using FLASHINFER attention backend out of potential backends: "
            "['FLASHINFER', 'FLASH_ATTN']",
            "cuda.py:366",
            CORE,
        )
        started = time.monotonic()
        step = self.knobs.load_s * SHARE["weights"] / plan.shards
        desc = "Loading safetensors checkpoint shards"
        log.bar_start()
        log.bar(tqdm_bar(desc, 0, plan.shards, 0.0, style="shards"), first=True)
        for done in range(1, plan.shards + 1):
            await self.pause(step)
            elapsed = time.monotonic() - started
            log.bar(tqdm_bar(desc, done, plan.shards, elapsed, style="shards"))
            if self.failure and self.failure.phase == "load" and done > plan.shards * 0.9:
                log.bar_end()
                self._fail_engine(str(self.failure), oom=True)
        log.bar_end()
        took = time.monotonic() - started
        log.info(f"Loading weights took {took:.2f} seconds", "default_loader.py:502", CORE)
        log.info(
            f"Model loading took {round(plan.model_gib, 2)} GiB memory and {took:.6f} seconds",
            "gpu_model_runner.py:5150",
            CORE,
        )

    async def _compile(self) -> float:
        """torch.compile as vLLM logs it on a GPU; the compile time, for the init-engine line."""
        started = time.monotonic()
        share = self.knobs.load_s * SHARE["compile"]
        log = self.log
        log.info("Starting torch.compile", "monitor.py:40", CORE)
        log.info(
            "Using cache directory: /root/.cache/vllm/torch_compile_cache/1f0c2b7a9d/rank_0_0/"
            "backbone for vLLM's torch.compile",
            "backends.py:1104",
            CORE,
        )
        await self.pause(share / 4)
        dynamo = time.monotonic() - started
        log.info(f"Dynamo bytecode transform time: {dynamo:.2f} s", "backends.py:1166", CORE)
        await self.pause(share * 3 / 4)
        total = time.monotonic() - started
        log.info(
            f"Compiling a graph for compile range (1, 8192) takes {total - dynamo:.2f} s",
            "backends.py:398",
            CORE,
        )
        log.info(f"torch.compile took {total:.2f} s in total", "monitor.py:57", CORE)
        log.info("Initial profiling/warmup run took 0.42 s", "monitor.py:91", CORE)
        log.info(
            "Encoder cache will be initialized with a budget of 16384 tokens, and profiled with "
            "1 image items of the maximum feature size.",
            "gpu_model_runner.py:5566",
            CORE,
        )
        return total

    async def _profile(self, plan: MemoryPlan) -> None:
        await self.pause(self.knobs.load_s * SHARE["profile"])
        if self.knobs.fault == "oom":
            self._fail_engine(oom_text(self.knobs, plan.model_gib), oom=True)
        if self.failure is not None:
            self._fail_engine(str(self.failure))
        log = self.log
        log.info(
            f"Available KV cache memory: {round(plan.kv_gib, 2)} GiB", "gpu_worker.py:760", CORE
        )
        # vLLM 0.23 logs the capacity on two lines (docs/runs/h200-vllm-0.23-*-startup.log);
        # 0.32's update_kv_cache_capacity puts both on one line.
        log.info(f"GPU KV cache size: {plan.kv_tokens:,} tokens", "kv_cache_utils.py:1744", CORE)
        log.info(
            f"Maximum concurrency for {plan.max_model_len:,} tokens per request: "
            f"{plan.max_concurrency:.2f}x",
            "kv_cache_utils.py:1745",
            CORE,
        )

    async def _graphs(self) -> None:
        started = time.monotonic()
        total = sum(n for _, n in GRAPH_PASSES)
        step = self.knobs.load_s * SHARE["graphs"] / total
        for mode, count in GRAPH_PASSES:
            desc = f"Capturing CUDA graphs ({mode})"
            pass_start = time.monotonic()
            self.log.bar_start()
            self.log.bar(tqdm_bar(desc, 0, count, 0.0), first=True)
            for done in range(1, count + 1):
                await self.pause(step)
                if done % 5 == 0 or done == count:
                    elapsed = time.monotonic() - pass_start
                    self.log.bar(tqdm_bar(desc, done, count, elapsed))
            self.log.bar_end()
        took = time.monotonic() - started
        self.log.info(
            f"Graph capturing finished in {max(1, round(took))} secs, took 1.21 GiB",
            "gpu_model_runner.py:6582",
            CORE,
        )

    def _fail_config(self, message: str) -> NoReturn:
        self.log.raw("Traceback (most recent call last):")
        self.log.raw('  File "/usr/local/bin/vllm", line 10, in <module>\n    sys.exit(main())')
        self.log.raw(f"pydantic_core._pydantic_core.ValidationError: 1 validation error for "
                     f"ModelConfig\n  Value error, {message}")  # fmt: skip
        raise EngineFailedError(message)

    def _fail_engine(self, message: str, *, oom: bool = False) -> NoReturn:
        where = "gpu_worker.py:276" if oom else "core.py:708"
        self.log.error("EngineCore failed to start.", "core.py:708", CORE)
        self.log.raw(
            "(EngineCore_DP0 pid={}) Traceback (most recent call last):\n"
            '  File "/usr/local/lib/python3.12/dist-packages/vllm/v1/worker/gpu_worker.py", '
            "line 276, in determine_available_memory\n"
            "    self.model_runner.profile_run()\n"
            f"{message}".format(self.log.pids[CORE])
        )
        self.log.error(f"Engine core initialization failed ({where})", "core_client.py:585")
        self.log.raw(
            "RuntimeError: Engine core initialization failed. See root cause above. "
            "Failed core proc(s): {}"
        )
        raise EngineFailedError(message)


def _fallback_plan(args: ServeArgs, knobs: Knobs) -> MemoryPlan:
    """Enough of a plan to print the load phases before a start-up failure shows."""
    total_gib, shards, arch = weights(args.model)
    max_len = args.max_model_len or NATIVE_MAX_MODEL_LEN
    model_gib = min(total_gib / max(1, args.tensor_parallel_size), knobs.gpu_memory_gib)
    return MemoryPlan(model_gib, 0.0, 0, max_len, shards, arch)
