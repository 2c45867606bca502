"""GPU memory arithmetic for the startup log: weights, KV cache size, maximum concurrency.

Numbers are Step-3.7-Flash's on a DGX Station GB300 (reference/vllm.md): FP8 weights take
~198.3 GiB, full-attention KV costs 24 KiB per token with an FP8 cache (12 layers x 8 heads x 128 x
2), and FP8 at --gpu-memory-utilization 0.95 leaves ~18.5 GiB, ~808k tokens, 3.08x at 256K.
"""

from __future__ import annotations

from dataclasses import dataclass

from appliance.simulator.args import ServeArgs
from appliance.simulator.knobs import Knobs

GIB = 2**30
NATIVE_MAX_MODEL_LEN = 262_144
OVERHEAD_GIB = 21.4  # activation peak (256K chunked prefill + vision profile), graphs, non-torch
FULL_ATTENTION_LAYERS = 12
KV_HEADS = 8
HEAD_DIM = 128


class StartupError(Exception):
    """The engine cannot start with these settings; the message is vLLM's.

    `phase` says when vLLM finds out: "config" (before loading), "load" (weights do not fit),
    "profile" (no room left for the KV cache, after the weights are in).
    """

    def __init__(self, message: str, phase: str) -> None:
        super().__init__(message)
        self.phase = phase


@dataclass(frozen=True)
class MemoryPlan:
    model_gib: float
    kv_gib: float
    kv_tokens: int
    max_model_len: int
    shards: int
    architecture: str

    @property
    def max_concurrency(self) -> float:
        return self.kv_tokens / self.max_model_len


def weights(model: str) -> tuple[float, int, str]:
    """(total GiB, shard count, architecture) for a model name."""
    name = model.lower()
    if "step" not in name:
        return 8.0, 4, "Qwen3ForCausalLM"
    arch = "Step3p7ForConditionalGeneration"
    if "nvfp4" in name:
        return 115.0, 27, arch
    if "fp8" in name:
        return 198.3, 50, arch
    return 442.5, 96, arch


def plan_memory(args: ServeArgs, knobs: Knobs) -> MemoryPlan:
    total_gib, shards, arch = weights(args.model)
    tp = max(1, args.tensor_parallel_size)
    model_gib = total_gib / tp
    max_len = args.max_model_len or NATIVE_MAX_MODEL_LEN
    if max_len > NATIVE_MAX_MODEL_LEN:
        raise StartupError(
            f"User-specified max_model_len ({max_len}) is greater than the derived max_model_len "
            f"(max_position_embeddings={NATIVE_MAX_MODEL_LEN} or model_max_length=None in model's "
            "config.json). To allow overriding this maximum, set the env var "
            "VLLM_ALLOW_LONG_MAX_MODEL_LEN=1. VLLM_ALLOW_LONG_MAX_MODEL_LEN must be used with "
            "extreme caution.",
            "config",
        )
    budget = knobs.gpu_memory_gib * args.gpu_memory_utilization
    if model_gib > budget:
        raise StartupError(_oom_text(knobs.gpu_memory_gib, model_gib), "load")
    kv_gib = budget - model_gib - OVERHEAD_GIB
    if kv_gib <= 0:
        raise StartupError(
            "ValueError: No available memory for the cache blocks. Try increasing "
            "`gpu_memory_utilization` when initializing the engine.",
            "profile",
        )
    kv_bytes = 1 if args.kv_cache_dtype.startswith("fp8") else 2
    per_token = FULL_ATTENTION_LAYERS * KV_HEADS * HEAD_DIM * 2 * kv_bytes / min(tp, KV_HEADS)
    kv_tokens = int(kv_gib * GIB / per_token) // 16 * 16
    if kv_tokens < max_len:
        needed = max_len * per_token / GIB
        raise StartupError(
            "ValueError: To serve at least one request with the models's max seq len "
            f"({max_len}), ({needed:.2f} GiB KV cache is needed, which is larger than the "
            f"available KV cache memory ({kv_gib:.2f} GiB). Based on the available memory, the "
            f"estimated maximum model length is {kv_tokens}. Try increasing "
            "`gpu_memory_utilization` or decreasing `max_model_len` when initializing the engine.",
            "profile",
        )
    return MemoryPlan(model_gib, kv_gib, kv_tokens, max_len, shards, arch)


def _oom_text(total_gib: float, want_gib: float) -> str:
    return (
        "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 1.75 GiB. GPU 0 has a "
        f"total capacity of {total_gib:.2f} GiB of which 312.00 MiB is free. Including "
        f"non-PyTorch memory, this process has {total_gib - 0.3:.2f} GiB memory in use. Of the "
        f"allocated memory {min(want_gib, total_gib) - 2.1:.2f} GiB is allocated by PyTorch, and "
        "1.21 GiB is reserved by PyTorch but unallocated. If reserved but unallocated memory is "
        "large try setting PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True to avoid "
        "fragmentation.  See documentation for Memory Management  "
        "(https://pytorch.org/docs/stable/notes/cuda.html#environment-variables)"
    )


def oom_text(knobs: Knobs, plan_model_gib: float) -> str:
    """The CUDA OOM message STEP_SIM_FAULT=oom prints."""
    return _oom_text(knobs.gpu_memory_gib, plan_model_gib)
