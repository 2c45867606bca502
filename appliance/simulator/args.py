"""`vllm serve`'s command line: the same flags, types and argparse errors (exit 2).

Only the flags that change the simulator's behaviour are used; the rest are accepted so that any
launch command from the seed model card (and the common vLLM flags around it) parses as it would
on a real engine, and a flag vLLM does not know is rejected the way vLLM rejects it.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

KV_CACHE_DTYPES = ("auto", "bfloat16", "fp8", "fp8_ds_mla", "fp8_e4m3", "fp8_e5m2", "fp8_inc")
QUANTIZATIONS = (
    "awq", "bitsandbytes", "compressed-tensors", "experts_int8", "fbgemm_fp8", "fp8",
    "gguf", "gptq", "gptq_marlin", "modelopt", "modelopt_fp4", "mxfp4", "nvfp4", "torchao",
)  # fmt: skip


@dataclass(frozen=True)
class ServeArgs:
    """The parsed flags the simulator acts on."""

    model: str
    served_model_names: tuple[str, ...]
    host: str | None
    port: int
    uds: str | None
    api_keys: tuple[str, ...]
    max_model_len: int | None
    limit_mm_per_prompt: dict[str, int]
    enable_sleep_mode: bool
    speculative_config: dict[str, Any] | None
    kv_cache_dtype: str
    gpu_memory_utilization: float
    tensor_parallel_size: int
    quantization: str | None
    reasoning_parser: str | None
    tool_call_parser: str | None
    enable_auto_tool_choice: bool
    max_num_seqs: int
    non_default: dict[str, Any] = field(default_factory=dict)
    allowed_origins: tuple[str, ...] = ("*",)  # 0.23's default: every origin
    allow_credentials: bool = False

    @property
    def served_name(self) -> str:
        return self.served_model_names[0]

    @property
    def num_speculative_tokens(self) -> int:
        if not self.speculative_config:
            return 0
        return int(self.speculative_config.get("num_speculative_tokens", 1))


def human_int(value: str) -> int:
    """vLLM's human-readable integers: 32k = 32,000, 32K = 32,768, 1m / 1M likewise, -1 = auto."""
    value = value.strip()
    multipliers = {"k": 10**3, "m": 10**6, "g": 10**9, "K": 2**10, "M": 2**20, "G": 2**30}
    if value and value[-1] in multipliers:
        return int(float(value[:-1]) * multipliers[value[-1]])
    return int(value)


def json_dict(value: str) -> dict[str, Any]:
    loaded = json.loads(value)
    if not isinstance(loaded, dict):
        raise TypeError(value)
    return loaded


json_dict.__name__ = "loads"  # argparse names the type in its error message, as vLLM's does


TOP_USAGE = (
    "usage: vllm [-h] [-v]\n"
    "            {chat,complete,serve,launch,bench,collect-env,download-kernels,preload,"
    "run-batch,snapshot}\n"
    "            ...\n"
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vllm serve",
        usage="vllm serve [model_tag] [options]",
        description="Launch a local OpenAI-compatible API server to serve LLM completions.",
    )
    add = parser.add_argument
    flag = argparse.BooleanOptionalAction
    add("model_tag", nargs="?", help="The model tag to serve (optional if specified in config)")
    add("--model", default=None)
    # Frontend
    add("--host", default=None)
    add("--port", type=int, default=8000)
    add("--uds", default=None)
    add("--uvicorn-log-level", default="info")
    add("--api-key", nargs="+", default=None)
    add("--served-model-name", nargs="+", default=None)
    add("--chat-template", default=None)
    add("--chat-template-content-format", default="auto")
    add("--response-role", default="assistant")
    add("--reasoning-parser", default=None)
    add("--tool-call-parser", default=None)
    add("--tool-parser-plugin", default=None)
    add("--enable-auto-tool-choice", action="store_true")
    # vLLM parses the CORS lists with json.loads (cli_args.py `_customize_cli_kwargs`), so a bad
    # value reads "argument --allowed-origins: invalid loads value: 'x'"; 0.23's default allows
    # every origin (["*"]), 0.32's none ([]).
    add("--allowed-origins", type=json.loads, default=None)
    add("--allow-credentials", action="store_true")
    add("--root-path", default=None)
    add("--middleware", action="append", default=None)
    add("--disable-log-requests", action="store_true")
    add("--enable-log-requests", action=flag, default=False)
    add("--disable-log-stats", action="store_true")
    add("--max-log-len", type=int, default=None)
    add("--disable-uvicorn-access-log", action=flag, default=False)
    add("--disable-fastapi-docs", action=flag, default=False)
    add("--enable-prompt-tokens-details", action=flag, default=False)
    add("--enable-server-load-tracking", action=flag, default=False)
    add("--enable-force-include-usage", action=flag, default=False)
    add("--enable-request-id-headers", action=flag, default=False)
    add("--ssl-keyfile", default=None)
    add("--ssl-certfile", default=None)
    # Model
    add("--tokenizer", default=None)
    add("--tokenizer-mode", default="auto")
    add("--trust-remote-code", action=flag, default=False)
    add("--dtype", default="auto")
    add("--seed", type=int, default=None)
    add("--revision", default=None)
    add("--code-revision", default=None)
    add("--tokenizer-revision", default=None)
    add("--max-model-len", type=human_int, default=None)
    add("--quantization", "-q", choices=QUANTIZATIONS, default=None)
    add("--enforce-eager", action=flag, default=False)
    add("--hf-overrides", type=json_dict, default=None)
    add("--generation-config", default="auto")
    add("--override-generation-config", type=json_dict, default=None)
    add("--allowed-local-media-path", default="")
    add("--limit-mm-per-prompt", type=json_dict, default=None)
    add("--mm-processor-kwargs", type=json_dict, default=None)
    add("--mm-processor-cache-gb", type=float, default=4.0)
    add("--mm-encoder-tp-mode", choices=("weights", "data"), default="weights")
    add("--media-io-kwargs", type=json_dict, default=None)
    add("--language-model-only", action=flag, default=False)
    # Load
    add("--load-format", default="auto")
    add("--download-dir", default=None)
    add("--safetensors-load-strategy", default="lazy")
    # Parallel
    add("--tensor-parallel-size", "-tp", type=int, default=1)
    add("--pipeline-parallel-size", "-pp", type=int, default=1)
    add("--data-parallel-size", "-dp", type=int, default=1)
    add("--enable-expert-parallel", "-ep", action=flag, default=False)
    add("--enable-eplb", action=flag, default=False)
    add("--distributed-executor-backend", default=None)
    add("--disable-custom-all-reduce", action=flag, default=False)
    # Cache
    add("--gpu-memory-utilization", type=float, default=0.9)
    add("--kv-cache-memory-bytes", type=human_int, default=None)
    add("--kv-cache-dtype", choices=KV_CACHE_DTYPES, default="auto")
    add("--block-size", type=int, default=None)
    add("--swap-space", type=float, default=4)
    add("--cpu-offload-gb", type=float, default=0)
    add("--enable-prefix-caching", action=flag, default=None)
    add("--calculate-kv-scales", action=flag, default=False)
    # Scheduler
    add("--max-num-seqs", type=int, default=None)
    add("--max-num-batched-tokens", type=human_int, default=None)
    add("--enable-chunked-prefill", action=flag, default=None)
    add("--async-scheduling", action=flag, default=None)
    add("--disable-cascade-attn", action=flag, default=False)
    add("--scheduling-policy", choices=("fcfs", "priority"), default="fcfs")
    # Speculative decoding, compilation, engine
    add("--speculative-config", type=json_dict, default=None)
    add("--compilation-config", "-O", default=None)
    add("--cuda-graph-sizes", nargs="+", type=int, default=None)
    add("--max-cudagraph-capture-size", type=int, default=None)
    add("--enable-sleep-mode", action=flag, default=False)
    add("--attention-backend", default=None)
    add("--kv-transfer-config", type=json_dict, default=None)
    add("--structured-outputs-config", type=json_dict, default=None)
    add("--otlp-traces-endpoint", default=None)
    return parser


def parse_args(argv: Sequence[str]) -> ServeArgs:
    """Parse `vllm serve` arguments; argparse prints the usage and exits 2 on bad input."""
    parser = build_parser()
    # vLLM's `--help=all` prints every flag group (FlexibleArgumentParser.format_help in
    # vllm/utils/argparse_utils.py); plain argparse would reject the value.
    ns, unknown = parser.parse_known_args(["--help" if a == "--help=all" else a for a in argv])
    if unknown:  # vLLM's top-level parser reports these, not `vllm serve`'s (real 0.32 log)
        sys.stderr.write(f"{TOP_USAGE}vllm: error: unrecognized arguments: {' '.join(unknown)}\n")
        raise SystemExit(2)
    model = ns.model_tag or ns.model or "Qwen/Qwen3-0.6B"
    if ns.model_tag and ns.model and ns.model_tag != ns.model:
        parser.error(f"model_tag {ns.model_tag!r} and --model {ns.model!r} differ")
    limits = ns.limit_mm_per_prompt or {}
    for modality, count in limits.items():
        if not isinstance(count, int) or count < 0:
            parser.error(f"argument --limit-mm-per-prompt: bad limit for {modality!r}: {count!r}")
    spec = ns.speculative_config
    if spec is not None and "num_speculative_tokens" not in spec and "model" not in spec:
        parser.error("argument --speculative-config: needs 'num_speculative_tokens'")
    if not 0 < ns.gpu_memory_utilization <= 1:
        parser.error("argument --gpu-memory-utilization: must be in (0, 1]")
    defaults = vars(parser.parse_args([]))
    non_default = {k: v for k, v in vars(ns).items() if v != defaults.get(k)}
    return ServeArgs(
        model=model,
        served_model_names=tuple(ns.served_model_name or [model]),
        host=ns.host,
        port=ns.port,
        uds=ns.uds,
        api_keys=tuple(ns.api_key or ()),
        max_model_len=ns.max_model_len if (ns.max_model_len or 0) > 0 else None,
        limit_mm_per_prompt={str(k): int(v) for k, v in limits.items()},
        enable_sleep_mode=bool(ns.enable_sleep_mode),
        speculative_config=spec,
        kv_cache_dtype=ns.kv_cache_dtype,
        gpu_memory_utilization=ns.gpu_memory_utilization,
        tensor_parallel_size=ns.tensor_parallel_size,
        quantization=ns.quantization,
        reasoning_parser=ns.reasoning_parser,
        tool_call_parser=ns.tool_call_parser,
        enable_auto_tool_choice=bool(ns.enable_auto_tool_choice),
        max_num_seqs=ns.max_num_seqs or 256,
        non_default=non_default,
        allowed_origins=("*",)
        if ns.allowed_origins is None
        else tuple(str(o) for o in ns.allowed_origins),
        allow_credentials=bool(ns.allow_credentials),
    )
