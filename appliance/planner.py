"""Fit planner: hardware + launch profiles -> which fit, with the numbers, and which one to run.

Pure: no NVML, Docker or files. The memory model follows `reference/vllm.md` §Step-3.7-Flash:

- vLLM may use `gpu_memory_utilization` of each GPU's total memory. Of that, the weights
  (checkpoint size / tensor-parallel size, expert parallel spreading the experts evenly) and a
  fixed per-GPU overhead are taken first; the rest is the KV-cache budget.
- Overhead assumption (`OVERHEAD_BYTES_PER_GPU`, 8 GiB): vLLM's profiling peak of activations
  (a full 8K-token prefill batch, the sampler and the vision encoder's dummy images), CUDA graphs
  (~1-2 GiB) and non-torch memory (CUDA context, NCCL, cuBLAS workspaces). Not measured on a
  GB300; chosen on the safe side so a plan that says "fits" is not an out-of-memory start.
- KV cache: 8 KV heads x 128 dims x (K and V) = 2,048 values per token per layer, 1 byte each
  with an FP8 KV cache, 2 with BF16. 12 of the 45 layers are full attention and hold every token
  (24 KiB per token with FP8); the 33 sliding-window layers hold 512 tokens each, ~34 MB per
  request. With MTP on, the 3 MTP layers are counted as full attention too (unconfirmed; the
  safe side).
- vLLM refuses to start when one request of `max_model_len` (the model's 262,144 tokens unless
  set) does not fit in the KV cache, so "fits" includes that.
- Data parallel (`--data-parallel-size N`, `profiles.with_data_parallel`): N replicas of the
  tensor-parallel group, each with its own KV cache. The plan offers it where a seed profile fits
  and the host has at least twice its GPUs: one replica per `tensor_parallel_size` GPUs. Each
  replica is fitted like the profile alone; the KV tokens and requests add up across replicas,
  the longest context is one replica's.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from appliance.errors import SettingsError
from appliance.hardware import GB, GIB, GpuInfo, Hardware
from appliance.profiles import PROFILES, Profile, get_profile, mtp_enabled, with_data_parallel
from appliance.settings import EngineSettings
from appliance.units import fmt_bytes

MODEL_MAX_CONTEXT = 262_144
KV_HEADS = 8
HEAD_DIM = 128
FULL_ATTENTION_LAYERS = 12
SLIDING_LAYERS = 33
SLIDING_WINDOW = 512
MTP_LAYERS = 3
OVERHEAD_BYTES_PER_GPU = 8 * GIB
DEFAULT_CONCURRENT = 4

ASSUMPTIONS = (
    "GB = 1e9 bytes; GiB = 2^30 bytes. GPU totals are what NVML reports.",
    "Weights: FP8 212.5 GB, BF16 475 GB (model card); NVFP4 120 GB is an estimate "
    "(unconfirmed, ~110-130 GB).",
    "Per GPU: 8 GiB for activations, CUDA graphs and non-torch memory (not measured on GB300).",
    "KV cache: 2 KiB per token per full-attention layer with FP8 KV (4 KiB with BF16 KV); "
    "12 full-attention layers (+3 MTP layers when MTP is on); sliding layers ~34 MB per request.",
    "Tensor parallel splits weights and KV heads evenly across the GPUs.",
)


def kv_value_bytes(profile: Profile) -> int:
    """Bytes per cached value: 1 with an FP8 KV cache, 2 with the model's BF16."""
    return 1 if (profile.kv_cache_dtype or "").startswith("fp8") else 2


def kv_bytes_per_token(profile: Profile, mtp: bool) -> int:
    """KV-cache bytes one token costs in the full-attention (and MTP) layers, all GPUs."""
    layers = FULL_ATTENTION_LAYERS + (MTP_LAYERS if mtp else 0)
    return layers * KV_HEADS * HEAD_DIM * 2 * kv_value_bytes(profile)


def sliding_bytes_per_request(profile: Profile) -> int:
    """KV-cache bytes each running request costs in the sliding-window layers, all GPUs."""
    return SLIDING_LAYERS * SLIDING_WINDOW * KV_HEADS * HEAD_DIM * 2 * kv_value_bytes(profile)


@dataclass
class ProfileFit:
    name: str
    fits: bool
    reasons: list[str]  # why it does not fit, in plain words (empty when it fits)
    reason_codes: list[str]  # the same reasons as stable codes, for scripts and tests
    weights_gb: float
    weights_per_gpu_gb: float
    memory_utilization: float
    kv_budget_gb: float | None  # all GPUs together; negative: the shortfall
    kv_tokens: int | None  # tokens the KV cache holds (full-attention layers)
    max_context: int | None  # longest context for one request
    max_context_at_n: int | None  # longest context each of n_concurrent requests can have
    n_concurrent: int
    requests_at_context: int | None  # requests of `context` tokens that fit at once
    context: int  # the context vLLM will be started with (max_model_len or the model's)
    kv_bytes_per_token: int
    mtp: bool
    gpu_uuids: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def gpu_uuid(self) -> str | None:
        return self.gpu_uuids[0] if self.gpu_uuids else None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["gpu_uuid"] = self.gpu_uuid
        return data


@dataclass
class Plan:
    hardware: Hardware
    profiles: list[ProfileFit]
    chosen: str | None
    chosen_reason: str
    assumptions: list[str] = field(default_factory=lambda: list(ASSUMPTIONS))

    def fit(self, name: str) -> ProfileFit:
        return next(f for f in self.profiles if f.name == name)

    @property
    def chosen_fit(self) -> ProfileFit | None:
        return None if self.chosen is None else self.fit(self.chosen)

    def to_dict(self) -> dict[str, Any]:
        chosen = self.chosen_fit
        return {
            "hardware": self.hardware.to_dict(),
            "chosen": self.chosen,
            "chosen_reason": self.chosen_reason,
            "chosen_gpu_uuids": chosen.gpu_uuids if chosen else [],
            "profiles": [f.to_dict() for f in self.profiles],
            "assumptions": self.assumptions,
        }


# ---------------------------------------------------------------------------------- the model


def rank_gpus(gpus: Iterable[GpuInfo]) -> list[GpuInfo]:
    """Best first: Blackwell before older, then the most memory (a Station's GB300 before an
    RTX PRO 6000 whatever their NVML order)."""
    return sorted(gpus, key=lambda g: (not g.is_blackwell, -(g.memory_total_bytes or 0), g.index))


def _pick_gpus(profile: Profile, hw: Hardware, engine: EngineSettings) -> list[GpuInfo]:
    ranked = rank_gpus(hw.gpus)
    if profile.gpu_count == 1 and engine.gpu_uuid:
        return [g for g in ranked if g.uuid == engine.gpu_uuid]
    return ranked[: profile.gpu_count]


def _floor_div(a: int, b: int) -> int:
    return max(0, a // b) if b > 0 else 0


def fit_profile(
    profile: Profile, hw: Hardware, engine: EngineSettings, concurrent: int = DEFAULT_CONCURRENT
) -> ProfileFit:
    """How `profile` fits `hw` with these engine settings: the numbers and every reason it fails."""
    mtp = mtp_enabled(profile, engine)
    util = engine.gpu_memory_utilization or profile.memory_utilization
    tp = profile.tensor_parallel_size
    context = engine.max_model_len or MODEL_MAX_CONTEXT
    per_token = kv_bytes_per_token(profile, mtp)
    sliding = sliding_bytes_per_request(profile)
    weights = int(profile.weights_gb * GB)
    result = ProfileFit(
        name=profile.name,
        fits=False,
        reasons=[],
        reason_codes=[],
        weights_gb=profile.weights_gb,
        weights_per_gpu_gb=round(profile.weights_gb / tp, 2),
        memory_utilization=util,
        kv_budget_gb=None,
        kv_tokens=None,
        max_context=None,
        max_context_at_n=None,
        n_concurrent=concurrent,
        requests_at_context=None,
        context=context,
        kv_bytes_per_token=per_token,
        mtp=mtp,
        notes=list(profile.notes),
    )
    if engine.mtp and not profile.supports_mtp:
        result.notes.append("engine.mtp is on but this checkpoint has no MTP weights: MTP is off.")

    def fail(code: str, reason: str) -> None:
        result.reason_codes.append(code)
        result.reasons.append(reason)

    if not hw.gpus:
        fail("no_gpu", f"no NVIDIA GPU found ({hw.nvml_error or 'NVML found none'})")
        return result
    gpus = _pick_gpus(profile, hw, engine)
    result.gpu_uuids = [g.uuid for g in gpus]
    if not gpus:
        fail(
            "gpu_not_found",
            f"engine.gpu_uuid is {engine.gpu_uuid}, which this machine does not have "
            "(`step-station plan --json` lists the GPUs)",
        )
        return result
    if len(hw.gpus) < profile.min_gpus:
        fail("too_few_gpus", f"needs {profile.min_gpus} GPUs, this machine has {len(hw.gpus)}")
    if profile.requires_blackwell:
        old = next((g for g in gpus if not g.is_blackwell), None)
        if old is not None:
            cc = "?" if old.compute_capability is None else "{}.{}".format(*old.compute_capability)
            fail(
                "not_blackwell",
                f"{profile.precision.upper()} needs a Blackwell GPU (this is an {old.name}, "
                f"compute capability {cc})",
            )
    unified = next((g for g in gpus if g.memory_total_bytes is None), None)
    if unified is not None:
        fail(
            "memory_unknown",
            f"NVML reports no memory size for the {unified.name} (unified memory), so the fit "
            "cannot be computed",
        )
        return result
    if "too_few_gpus" in result.reason_codes:
        return result  # numbers for GPUs the machine does not have would mislead

    smallest = min(gpus, key=lambda g: g.memory_total_bytes or 0)
    total = smallest.memory_total_bytes or 0
    usable = int(total * util)
    weights_per_gpu = weights // tp
    budget_per_gpu = usable - weights_per_gpu - OVERHEAD_BYTES_PER_GPU
    budget = budget_per_gpu * tp  # one replica's KV cache
    dp = profile.data_parallel_size
    per_replica = -(-concurrent // dp)  # vLLM's API server spreads requests over the replicas
    result.kv_budget_gb = round(budget * dp / GB, 2)
    result.kv_tokens = _floor_div(budget, per_token) * dp
    result.max_context = min(MODEL_MAX_CONTEXT, _floor_div(budget - sliding, per_token))
    result.max_context_at_n = min(
        MODEL_MAX_CONTEXT, _floor_div(budget - per_replica * sliding, per_replica * per_token)
    )
    result.requests_at_context = _floor_div(budget, context * per_token + sliding) * dp

    if weights_per_gpu > usable:
        share = "" if tp == 1 else f", {fmt_bytes(weights_per_gpu)} per GPU across {tp}"
        fail(
            "weights_exceed_memory",
            f"{profile.precision.upper()} weights need {fmt_bytes(weights)} "
            f"({profile.weights_gb:g} GB on the model card{share}), "
            f"{'this GPU' if tp == 1 else f'each {smallest.name}'} has {fmt_bytes(total)} "
            f"({fmt_bytes(usable)} at {util:g} memory utilization)",
        )
    elif budget_per_gpu <= 0:
        fail(
            "no_kv_room",
            f"after {fmt_bytes(weights_per_gpu)} of weights and "
            f"{fmt_bytes(OVERHEAD_BYTES_PER_GPU)} of activation and CUDA-graph overhead, "
            f"{util:g} of {fmt_bytes(total)} leaves no room "
            "for the KV cache",
        )
    elif result.requests_at_context == 0:
        fit_len = max(0, result.max_context // 1024 * 1024)
        fail(
            "context_too_long",
            f"the KV cache holds {result.kv_tokens:,} tokens, less than one {context:,}-token "
            f"request; run `step-station config set engine.max_model_len {fit_len}` or lower",
        )
    for gpu in gpus:
        used = gpu.memory_used_bytes or 0
        if gpu.memory_total_bytes and used > gpu.memory_total_bytes - usable:
            fail(
                "memory_in_use",
                f"{fmt_bytes(used)} of {gpu.name} {gpu.uuid} is already in use; vLLM needs "
                f"{fmt_bytes(usable)} free at {util:g} memory utilization (stop the other GPU "
                "processes or lower engine.gpu_memory_utilization)",
            )
    result.fits = not result.reasons
    return result


def _choose(
    fits: list[ProfileFit], engine: EngineSettings, by_name: Mapping[str, Profile]
) -> tuple[str | None, str]:
    if engine.profile and engine.profile != "auto":
        wanted = next((f for f in fits if f.name == engine.profile), None)
        if wanted is None:
            return None, f"engine.profile is {engine.profile!r}, which is not a known profile"
        if not wanted.fits:
            why = "; ".join(wanted.reasons)
            return None, f"engine.profile is {wanted.name!r}, which does not fit: {why}"
        return wanted.name, f"engine.profile is set to {wanted.name!r} and it fits"
    fitting = [f for f in fits if f.fits]
    if not fitting:
        return None, "no launch profile fits this machine"
    # MTP first: MTP-3 speculative decoding is what gives the 100-300 tok/s single stream, and
    # only the BF16/FP8 checkpoints ship MTP weights. Then the largest KV cache.
    best = max(fitting, key=lambda f: (by_name[f.name].supports_mtp, f.kv_tokens or 0))
    others = [f for f in fitting if f is not best]
    reason = f"{best.name} fits with {best.kv_tokens or 0:,} KV tokens"
    no_mtp = [f for f in others if not by_name[f.name].supports_mtp]
    if by_name[best.name].supports_mtp and no_mtp:
        alt = max(no_mtp, key=lambda f: f.kv_tokens or 0)
        reason += (
            f"; preferred over {alt.name} because the {by_name[best.name].precision.upper()} "
            "checkpoint keeps the MTP weights (MTP-3 speculative decoding, the model card's "
            f"100-300 tok/s single stream) and NVFP4 ships none ({alt.name} would hold "
            f"{alt.kv_tokens or 0:,} KV tokens)"
        )
    elif others:
        reason += f", the largest KV cache of the {len(fitting)} profiles that fit"
    return best.name, reason


def plan(
    hardware: Hardware,
    profiles: Iterable[Profile] | Mapping[str, Profile] = PROFILES,
    engine_settings: EngineSettings | None = None,
    *,
    concurrent: int = DEFAULT_CONCURRENT,
    data_parallel: bool = True,
) -> Plan:
    """Fit every profile to `hardware` and pick the one the appliance would run.

    With `data_parallel`, a profile that fits and leaves the host's other GPUs idle is offered
    again as `NAME-dpN` (vLLM's --data-parallel-size) using them all."""
    engine = engine_settings or EngineSettings()
    items = list(profiles.values() if isinstance(profiles, Mapping) else profiles)
    fits = [fit_profile(p, hardware, engine, concurrent) for p in items]
    if data_parallel:
        for fit, prof in list(zip(fits, items, strict=True)):
            replicas = data_parallel_replicas(prof, hardware) if fit.fits else 0
            if replicas >= 2:
                items.append(with_data_parallel(prof, replicas))
                fits.append(fit_profile(items[-1], hardware, engine, concurrent))
    wanted = engine.profile
    if wanted not in ("", "auto") and wanted not in {p.name for p in items}:
        with contextlib.suppress(SettingsError):  # an unknown name: _choose says so
            items.append(get_profile(wanted))  # e.g. a -dpN the hardware was not offered
            fits.append(fit_profile(items[-1], hardware, engine, concurrent))
    chosen, reason = _choose(fits, engine, {p.name: p for p in items})
    return Plan(hardware=hardware, profiles=fits, chosen=chosen, chosen_reason=reason)


def data_parallel_replicas(profile: Profile, hw: Hardware) -> int:
    """How many replicas of `profile` the host's GPUs hold side by side (0 or 1: no data
    parallel), for a seed profile."""
    if profile.data_parallel_size != 1 or profile.tensor_parallel_size < 1:
        return 0
    return len(hw.gpus) // profile.tensor_parallel_size
