"""The seed model card's launch configurations as data, and the pure functions that build argv.

Every `vllm serve` command in the seed (`../shared/seed/000_5455787a14b4f9d5.txt`) is a
`Profile`; `seed_command(profile)` gives it back token for token (tests/unit/test_profiles.py
parses the seed and compares). `build_vllm_args(profile, engine)` is what the appliance runs: the
seed's command after `vllm serve` (the container image's entrypoint is already `vllm serve`),
then the appliance's own flags. Nothing here touches Docker, NVML or the network.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from appliance import endpoint
from appliance.errors import SettingsError
from appliance.settings import EngineSettings, cache_dir

STATION_SERVED_NAME = "step3p7-flash"
MTP_CONFIG = '{"method": "mtp", "num_speculative_tokens": 3}'
VLLM_DEFAULT_GPU_MEMORY_UTILIZATION = 0.9  # vLLM's own default when a command sets none
CONTAINER_HF_HOME = "/root/.cache/huggingface"

# The flags every seed command shares (reasoning and tool parsers, remote code).
_PARSERS = (
    "--reasoning-parser",
    "step3p5",
    "--tool-call-parser",
    "step3p5",
    "--enable-auto-tool-choice",
)

# The DGX Station single-GPU command, exactly as the seed writes it after the model.
_STATION_FLAGS = (
    "--served-model-name",
    STATION_SERVED_NAME,
    "--tensor-parallel-size",
    "1",
    "--gpu-memory-utilization",
    "0.95",
    "--kv-cache-dtype",
    "fp8",
    *_PARSERS,
    "--trust-remote-code",
)

# BF16 and FP8 on 8 GPUs share their flags in the seed.
_TP8_FLAGS = (
    "--served-model-name",
    STATION_SERVED_NAME,
    "--tensor-parallel-size",
    "8",
    "--enable-expert-parallel",
    "--disable-cascade-attn",
    *_PARSERS,
    "--speculative-config",
    MTP_CONFIG,
    "--trust-remote-code",
)

_NVFP4_TP4_FLAGS = (
    "--served-model-name",
    "step3p7",
    "--tensor-parallel-size",
    "4",
    "--gpu-memory-utilization",
    "0.9",
    "--enable-expert-parallel",
    "--quantization",
    "modelopt",
    "--kv-cache-dtype",
    "fp8",
    *_PARSERS,
    "--async-scheduling",
    "--trust-remote-code",
)


@dataclass(frozen=True)
class Profile:
    """One launch configuration from the seed model card."""

    name: str
    checkpoint: str  # Hugging Face repo id
    served_model_name: str
    precision: str  # "bf16" | "fp8" | "nvfp4"
    tensor_parallel_size: int
    gpu_memory_utilization: float | None  # None: vLLM's default (0.9)
    kv_cache_dtype: str | None  # None: the model's dtype (BF16 KV cache)
    weights_gb: float  # checkpoint size in GB (1e9 bytes), as the model card states it
    weights_confirmed: bool  # False where the size is an estimate (NVFP4)
    requires_blackwell: bool
    min_gpus: int
    supports_mtp: bool  # the checkpoint ships MTP weights
    supports_sleep: bool
    station: bool  # a DGX Station single-GPU profile
    seed_flags: tuple[str, ...]  # the seed's flags after the model, in the seed's order
    # Flags the appliance adds for this profile beyond the seed, with the reason in `notes`.
    extra_flags: tuple[str, ...] = ()
    summary: str = ""
    notes: tuple[str, ...] = field(default_factory=tuple)
    # vLLM's --data-parallel-size: replicas of the tensor-parallel group in one engine (one
    # endpoint); the seed's profiles are 1, `with_data_parallel` makes the others.
    data_parallel_size: int = 1

    @property
    def gpu_count(self) -> int:
        """GPUs one engine of this profile takes: tensor parallel x data parallel."""
        return self.tensor_parallel_size * self.data_parallel_size

    @property
    def seed_profile(self) -> str:
        """The seed profile this one is built on (itself for the seed's own)."""
        return self.name.rsplit("-dp", 1)[0] if self.data_parallel_size > 1 else self.name

    @property
    def memory_utilization(self) -> float:
        """The fraction of GPU memory vLLM may use with this profile's own flags."""
        if self.gpu_memory_utilization is None:
            return VLLM_DEFAULT_GPU_MEMORY_UTILIZATION
        return self.gpu_memory_utilization

    @property
    def seed_has_mtp(self) -> bool:
        return "--speculative-config" in self.seed_flags


_CASCADE_NOTE = (
    "The appliance adds --disable-cascade-attn: the seed's troubleshooting says to always pass "
    "it (the hybrid sliding/global attention schedule does not work with cascade attention)."
)
# Flags the appliance passes that an engine image may no longer know, and that are safe to drop
# from the command line when it does not (the engine's flag check, `engine/compat.py`): flag ->
# why dropping it changes nothing. The flags take no value.
NOOP_FLAGS: dict[str, str] = {
    # vLLM removed cascade attention; 0.32 keeps the flag only to warn ("--disable-cascade-attn
    # is deprecated and has no effect since cascade attention has been removed. It will be
    # removed in v0.33.0.": vllm/engine/arg_utils.py, _DISABLE_CASCADE_ATTN_DEPRECATION_MESSAGE;
    # vllm/config/model.py, ModelConfig.disable_cascade_attn). An image without the flag has no
    # cascade attention left to disable.
    "--disable-cascade-attn": "vLLM removed cascade attention, so there is nothing to disable; "
    "the flag has had no effect since vLLM 0.32 and is due for removal",
}
_NVFP4_MTP_NOTE = "The NVFP4 checkpoint ships no MTP weights, so MTP is not offered."
_NVFP4_SIZE_NOTE = "NVFP4 checkpoint size is unconfirmed (~110-130 GB); 120 GB is assumed."

PROFILES: dict[str, Profile] = {
    p.name: p
    for p in (
        Profile(
            name="fp8-tp1",
            checkpoint="stepfun-ai/Step-3.7-Flash-FP8",
            served_model_name=STATION_SERVED_NAME,
            precision="fp8",
            tensor_parallel_size=1,
            gpu_memory_utilization=0.95,
            kv_cache_dtype="fp8",
            weights_gb=212.5,
            weights_confirmed=True,
            requires_blackwell=False,
            min_gpus=1,
            supports_mtp=True,
            supports_sleep=True,
            station=True,
            seed_flags=_STATION_FLAGS,
            extra_flags=("--disable-cascade-attn",),
            summary="DGX Station, one GPU, FP8 weights, FP8 KV cache",
            notes=(_CASCADE_NOTE,),
        ),
        Profile(
            name="nvfp4-tp1",
            checkpoint="stepfun-ai/Step-3.7-Flash-NVFP4",
            served_model_name=STATION_SERVED_NAME,
            precision="nvfp4",
            tensor_parallel_size=1,
            gpu_memory_utilization=0.95,
            kv_cache_dtype="fp8",
            weights_gb=120.0,
            weights_confirmed=False,
            requires_blackwell=True,
            min_gpus=1,
            supports_mtp=False,
            supports_sleep=True,
            station=True,
            # The seed: "Swap in stepfun-ai/Step-3.7-Flash-NVFP4 to run the NVFP4 checkpoint".
            seed_flags=_STATION_FLAGS,
            extra_flags=("--quantization", "modelopt", "--disable-cascade-attn"),
            summary="DGX Station, one GPU, NVFP4 weights (Blackwell only), FP8 KV cache",
            notes=(
                "The appliance adds --quantization modelopt: the seed says NVFP4 requires "
                "modelopt quantization.",
                _CASCADE_NOTE,
                _NVFP4_MTP_NOTE,
                _NVFP4_SIZE_NOTE,
            ),
        ),
        Profile(
            name="bf16-tp8",
            checkpoint="stepfun-ai/Step-3.7-Flash",
            served_model_name=STATION_SERVED_NAME,
            precision="bf16",
            tensor_parallel_size=8,
            gpu_memory_utilization=None,
            kv_cache_dtype=None,
            weights_gb=475.0,
            weights_confirmed=True,
            requires_blackwell=False,
            min_gpus=8,
            supports_mtp=True,
            supports_sleep=True,
            station=False,
            seed_flags=_TP8_FLAGS,
            summary="8xH200/B200, BF16 weights, expert parallel, MTP-3",
        ),
        Profile(
            name="fp8-tp8",
            checkpoint="stepfun-ai/Step-3.7-Flash-FP8",
            served_model_name=STATION_SERVED_NAME,
            precision="fp8",
            tensor_parallel_size=8,
            gpu_memory_utilization=None,
            kv_cache_dtype=None,
            weights_gb=212.5,
            weights_confirmed=True,
            requires_blackwell=False,
            min_gpus=8,
            supports_mtp=True,
            supports_sleep=True,
            station=False,
            seed_flags=_TP8_FLAGS,
            summary="8xH200/B200, FP8 weights, expert parallel, MTP-3",
        ),
        Profile(
            name="nvfp4-tp4",
            checkpoint="stepfun-ai/Step-3.7-Flash-NVFP4",
            served_model_name="step3p7",
            precision="nvfp4",
            tensor_parallel_size=4,
            gpu_memory_utilization=0.9,
            kv_cache_dtype="fp8",
            weights_gb=120.0,
            weights_confirmed=False,
            requires_blackwell=True,
            min_gpus=4,
            supports_mtp=False,
            supports_sleep=True,
            station=False,
            seed_flags=_NVFP4_TP4_FLAGS,
            summary="4xB200, NVFP4 weights (Blackwell only), FP8 KV cache, async scheduling",
            notes=(_NVFP4_MTP_NOTE, _NVFP4_SIZE_NOTE),
        ),
    )
}


_DP_NAME = re.compile(r"^(?P<base>.+)-dp(?P<dp>[0-9]+)$")


def with_data_parallel(profile: Profile, replicas: int) -> Profile:
    """`profile` run `replicas` times side by side in one engine: vLLM's data parallel.

    The seed's command stays token for token; `--data-parallel-size N` is added after it. vLLM
    then starts N engine cores behind one API server, each on its own `tensor_parallel_size`
    GPUs of the ones the container sees (docs/scale-out.md cites vLLM's source), so the engine
    needs tensor parallel x N GPUs. With `--enable-expert-parallel` the experts are spread over
    all of them; the memory model keeps the tensor-parallel share per GPU (the safe side).
    """
    if profile.data_parallel_size != 1:
        raise SettingsError(f"{profile.name} is already data parallel.")
    if replicas < 2:
        raise SettingsError(
            f"Data parallel needs 2 or more replicas, not {replicas}.",
            hint=f"Use {profile.name} itself for one replica.",
        )
    gpus = profile.tensor_parallel_size * replicas
    return dataclasses.replace(
        profile,
        name=f"{profile.name}-dp{replicas}",
        min_gpus=gpus,
        station=False,
        extra_flags=(*profile.extra_flags, "--data-parallel-size", str(replicas)),
        data_parallel_size=replicas,
        summary=f"{profile.summary}; x{replicas} data parallel on {gpus} GPUs, one endpoint",
        notes=(
            *profile.notes,
            f"The appliance adds --data-parallel-size {replicas}: {replicas} replicas of "
            f"{profile.name} ({profile.tensor_parallel_size} GPU(s) each) behind one vLLM API "
            "server, which balances requests across them.",
        ),
    )


def get_profile(name: str) -> Profile:
    """The profile called `name` (a seed profile, or one with `-dpN` for N data-parallel
    replicas of it); a clear error naming the choices otherwise."""
    if name in PROFILES:
        return PROFILES[name]
    match = _DP_NAME.match(name)
    if match and match.group("base") in PROFILES:
        return with_data_parallel(PROFILES[match.group("base")], int(match.group("dp")))
    raise SettingsError(
        f"Unknown launch profile {name!r}.",
        hint=f"Choose one of: {', '.join(PROFILES)}, or one of them with -dpN for N "
        "data-parallel replicas (`step-station plan` shows which fit).",
    )


def seed_command(profile: Profile) -> list[str]:
    """The seed model card's `vllm serve ...` command for this profile, token for token."""
    return ["vllm", "serve", profile.checkpoint, *profile.seed_flags]


def mtp_enabled(profile: Profile, engine: EngineSettings) -> bool:
    """Whether the engine will run MTP speculative decoding with these settings."""
    return profile.seed_has_mtp or (engine.mtp and profile.supports_mtp)


def _set_flag(args: list[str], flag: str, value: str) -> None:
    """Replace the value of `flag` in place if present (keeps the seed's order), else append."""
    if flag in args:
        args[args.index(flag) + 1] = value
    else:
        args += [flag, value]


def build_vllm_args(
    profile: Profile, engine: EngineSettings, *, listen_host: str | None = None, uds: str = ""
) -> list[str]:
    """Arguments after `vllm serve`: the model, the seed's flags, then the appliance's own.

    Where vLLM listens (appliance/endpoint.py): with `engine.listen = "socket"` on the Unix
    socket `uds` (inside a container its mounted path; by default the host's socket path), with
    "tcp" on `listen_host` (default `engine.host`) and `engine.port`.
    """
    args = [engine.model_override or profile.checkpoint, *profile.seed_flags]
    args += profile.extra_flags
    # The appliance's own needs.
    _set_flag(args, "--served-model-name", profile.served_model_name)
    if endpoint.uses_socket(engine):
        args += ["--uds", uds or str(endpoint.socket_path(engine.container_name))]
    else:
        args += ["--host", listen_host or engine.host, "--port", str(engine.port)]
    if engine.max_model_len > 0:
        _set_flag(args, "--max-model-len", str(engine.max_model_len))
    args += ["--limit-mm-per-prompt", json.dumps({"image": engine.max_images_per_prompt})]
    if engine.gpu_memory_utilization > 0:
        _set_flag(args, "--gpu-memory-utilization", f"{engine.gpu_memory_utilization:g}")
    if engine.mtp and profile.supports_mtp and not profile.seed_has_mtp:
        args += ["--speculative-config", MTP_CONFIG]
    if engine.sleep_mode and profile.supports_sleep:
        args.append("--enable-sleep-mode")
    return args


def engine_environment(profile: Profile, engine: EngineSettings) -> dict[str, str]:
    """Environment variables the engine needs with these settings (no secrets)."""
    env: dict[str, str] = {}
    if engine.sleep_mode and profile.supports_sleep:
        env["VLLM_SERVER_DEV_MODE"] = "1"  # /sleep and /wake_up exist only in dev mode
    return env


def hf_cache_path(engine: EngineSettings) -> Path:
    """Where model weights live on the host (mounted into the container).

    The same rule as `appliance.engine.spec.hf_cache_root` (a test holds them together).
    """
    if engine.hf_cache_dir:
        return Path(engine.hf_cache_dir).expanduser()
    if os.environ.get("STEP_STATION_HOME"):
        return cache_dir() / "huggingface"
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser()
    return Path.home() / ".cache" / "huggingface"


def docker_run_command(
    profile: Profile, engine: EngineSettings, gpu_uuids: Sequence[str] = ()
) -> list[str]:
    """The `docker run ...` equivalent of what the appliance starts, for a human to read or run.

    GPUs by UUID (a Station may also hold an RTX PRO card and the order is not guaranteed),
    host IPC, unlimited memlock and a 64 MiB stack as NVIDIA's Station scripts do, and the host's
    Hugging Face cache mounted. As the appliance runs it (docs/security.md): vLLM on the private
    socket folder mounted into the container and nothing published (with `engine.listen = tcp`: on
    the host's network with vLLM on 127.0.0.1 only), and CORS closed. HF_TOKEN and VLLM_API_KEY
    are passed through by name from the caller's environment, never written out.
    """
    if gpu_uuids:
        gpus = "device=" + ",".join(gpu_uuids)
        if len(gpu_uuids) > 1:
            gpus = f'"{gpus}"'  # docker's --gpus parses CSV: several devices need inner quotes
    else:
        gpus = "all"
    socket = endpoint.uses_socket(engine)
    if socket:  # Docker's bridge with nothing published: the engine may still download weights
        folder = endpoint.socket_dir(engine.container_name)
        network = ["-v", f"{folder}:{endpoint.CONTAINER_SOCKET_DIR}"]
    else:
        network = ["--network", "host"]
    cmd = [
        "docker",
        "run",
        "-d",
        "--name",
        engine.container_name,
        "--gpus",
        gpus,
        "--ipc",
        "host",
        "--ulimit",
        "memlock=-1",
        "--ulimit",
        "stack=67108864",
        *network,
        "-e",
        "HF_TOKEN",
        "-e",
        "VLLM_API_KEY",
    ]
    for key, value in engine_environment(profile, engine).items():
        cmd += ["-e", f"{key}={value}"]
    cmd += ["-v", f"{hf_cache_path(engine)}:{CONTAINER_HF_HOME}", engine.image]
    return (
        cmd
        + build_vllm_args(
            profile,
            engine,
            listen_host="127.0.0.1",
            uds=endpoint.CONTAINER_SOCKET if socket else "",
        )
        + [
            "--allowed-origins",
            "[]",
        ]
    )


def format_command(argv: Sequence[str]) -> str:
    """One shell-safe line."""
    return shlex.join(argv)
