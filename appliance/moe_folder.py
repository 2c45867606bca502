"""The tuned MoE config folder as every engine start sees it: vLLM's setting, its file names, its
format check, and whether a start mounts the folder.

A base module (like endpoint.py) because two rooms that must not import each other both need it:
the engine (every start mounts the folder) and the bench room's tuner (which fills it).
`appliance/bench/tune.py` builds on it and re-exports these names.

vLLM's lookup (0.32.0, `vllm/model_executor/layers/fused_moe/fused_moe.py` lines 1109-1168,
`get_moe_configs`): it joins `$VLLM_TUNED_CONFIG_FOLDER` (`vllm/envs.py:1987`) with the one file
name it wants, opens that file if it exists, `json.load`s it, drops `triton_version` and does
`int(key)` on every other key, with no error handling. So:

- a folder holding no file of the wanted name is harmless: vLLM falls back to its shipped configs
  and logs `Using default MoE config ... Config file not found at <folder>/<name>, ...`;
- a file of the wanted name that is not valid JSON, or has a key that is not a batch size, makes
  the engine fail while loading the model (minutes into a start of a 198B checkpoint).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from appliance.settings import data_dir

log = logging.getLogger(__name__)

ENV_VAR = "VLLM_TUNED_CONFIG_FOLDER"
# Where the folder appears inside the engine container (fixed: the env var names it).
CONTAINER_FOLDER = "/opt/step-station/moe-configs"

REQUIRED_KEYS = (
    "BLOCK_SIZE_M",
    "BLOCK_SIZE_N",
    "BLOCK_SIZE_K",
    "GROUP_SIZE_M",
    "num_warps",
    "num_stages",
)
# Triton block sizes feed `tl.arange`, which takes powers of two only.
_POWER_OF_TWO_KEYS = ("BLOCK_SIZE_M", "BLOCK_SIZE_N", "BLOCK_SIZE_K")

# The names `get_config_file_name` (fused_moe.py lines 1093-1104) builds.
NAME = re.compile(
    r"^E=(?P<E>\d+),N=(?P<N>\d+),device_name=(?P<device>[^,]+)"
    r"(?:,dtype=(?P<dtype>[^,]+))?"
    r"(?:,block_shape=\[(?P<bn>\d+),(?P<bk>\d+)\])?\.json$"
)


def default_folder() -> Path:
    """The persistent folder for tuned configs: kept with the appliance's data, not its cache,
    because tuning one GPU takes hours."""
    return data_dir() / "moe-configs"


# --------------------------------------------------------------------------------- format


def check_config(data: object) -> list[str]:
    """What is wrong with a decoded config file for vLLM's loader (empty if nothing)."""
    if not isinstance(data, dict):
        return [f"not a JSON object (got {type(data).__name__})"]
    problems: list[str] = []
    sizes = 0
    for key, entry in data.items():
        if key == "triton_version":
            if not isinstance(entry, str):
                problems.append(f"triton_version is {entry!r}, not a string")
            continue
        if not is_batch_size(key):
            # vLLM does int(key) on every key but triton_version; anything else crashes it.
            problems.append(f"key {key!r} is not a batch size")
            continue
        sizes += 1
        problems.extend(_check_entry(key, entry))
    if not sizes:
        problems.append("no batch sizes")
    return problems


def is_batch_size(key: str) -> bool:
    # ASCII digits only: str.isdigit() also takes "²", which int() refuses.
    return key.isascii() and key.isdigit() and int(key) > 0


def _check_entry(key: str, entry: object) -> list[str]:
    if not isinstance(entry, dict):
        return [f"batch size {key}: not an object"]
    problems: list[str] = []
    for name in REQUIRED_KEYS:
        value = entry.get(name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            problems.append(f"batch size {key}: {name} is {value!r}, not a positive integer")
        elif name in _POWER_OF_TWO_KEYS and value & (value - 1):
            problems.append(f"batch size {key}: {name} is {value}, not a power of two")
    for name, value in entry.items():
        if name not in REQUIRED_KEYS and not isinstance(value, (int, str)):
            problems.append(f"batch size {key}: {name} is {value!r}")
    return problems


def file_problems(path: Path) -> list[str]:
    """What vLLM would trip on in one config file (empty when it would load it)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        return [f"unreadable: {err}"]
    return check_config(data)


# ---------------------------------------------------------------------------------- engine


@dataclass(frozen=True)
class Mount:
    host: Path
    container: str
    read_only: bool = True


@dataclass(frozen=True)
class EngineTuning:
    """What an engine launch adds so vLLM reads the tuned configs: one env var and, for the
    container engine, a read-only bind mount of the folder."""

    env: Mapping[str, str] = field(default_factory=dict)
    mounts: tuple[Mount, ...] = ()


def engine_tuning(folder: Path, *, in_container: bool = True) -> EngineTuning:
    """The env (and mount) for an engine started with tuned configs in `folder`. The pip-route
    engine runs on the host and reads the folder where it is."""
    if not in_container:
        return EngineTuning(env={ENV_VAR: str(folder)})
    return EngineTuning(
        env={ENV_VAR: CONTAINER_FOLDER},
        mounts=(Mount(host=folder, container=CONTAINER_FOLDER),),
    )


def tuning_for_start(folder: Path, *, in_container: bool = True) -> EngineTuning | None:
    """The tuning an engine start gets, or None to start without the setting.

    Given whenever the folder holds at least one file named the way vLLM names configs and every
    such file loads: vLLM picks its file by name (GPU, shape, dtype), so configs for other GPUs
    or shapes beside ours cost nothing, and the engine need not know its GPU's name or the
    model's shape to decide. Left out when the folder has no config (the setting would change
    nothing, and leaving it out keeps the container spec and the settings hash what they were
    before tuning existed), and when any config-named file is broken: vLLM would crash on it
    while loading the model if it is the one it wants, and running with vLLM's shipped defaults
    costs speed, not a failed start. The Model tab names the broken file."""
    if not folder.is_dir():
        return None
    named = sorted(p for p in folder.glob("*.json") if NAME.match(p.name) and p.is_file())
    if not named:
        return None
    broken = {p.name: problems for p in named if (problems := file_problems(p))}
    if broken:
        name, problems = next(iter(broken.items()))
        log.warning(
            "tuned MoE configs in %s left out of this start: %s is not in vLLM's format (%s)",
            folder,
            name,
            problems[0],
        )
        return None
    return engine_tuning(folder, in_container=in_container)
