"""The engine's launch spec, built as frozen data by pure functions, then handed to a runtime once.

Everything Docker (or a subprocess) needs is decided here: image, `vllm serve` arguments, GPU by
UUID, ipc/ulimits, the network (the host's, with vLLM on loopback only), cache mounts, environment
and ownership labels. Tests check the spec without Docker; one integration test checks it on a
created container. Secrets (the per-start engine key, the HF token) never enter `env`, `args` or
`labels`: see `with_engine_key` and docs/security.md.
"""

from __future__ import annotations

import dataclasses
import hashlib
import ipaddress
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appliance import endpoint
from appliance import settings as st
from appliance.engine import phases
from appliance.engine.engine_key import LABEL_KEY_ID, EngineKey
from appliance.moe_folder import EngineTuning
from appliance.settings import EngineSettings

CONTAINER_HOME = "/root"

LABEL_MANAGED = "io.step-station.managed"
LABEL_NAME = "io.step-station.name"
LABEL_PROFILE = "io.step-station.profile"
LABEL_SETTINGS_HASH = "io.step-station.settings-hash"
LABEL_PORT = "io.step-station.port"
LABEL_SERVED_NAME = "io.step-station.served-model-name"
LABEL_ENGINE_KEY_ID = LABEL_KEY_ID

# Inside the container: the per-start key folder, mounted read-only (see engine_key.py).
ENGINE_KEY_DIR = "/run/step-station"
# vLLM's CORS default is allow-all in 0.23 (`allowed_origins` default ["*"] in
# vllm/entrypoints/openai/cli_args.py) and closed in 0.32 (`[]` in
# vllm/entrypoints/launchers/cli_args.py): pass the closed value, so no web page can read the
# engine's answers whatever the image's version. (The flag's value is parsed with json.loads.)
CLOSED_ORIGINS = "[]"
# With `engine.listen = "tcp"` the engine shares the host's network namespace and vLLM listens on
# loopback only: nothing is published through Docker's NAT (whose loopback publishing other hosts
# on the LAN could reach before Docker 28.0), and no other container can reach it. By default it
# listens on a Unix socket instead (endpoint.py) and the container has no network
# (`LaunchSpec.container_network`). Routes outside /v1 (/tokenize, /pause, and with sleep mode
# /sleep, /collective_rpc, ...) are outside vLLM's key check, so where the engine listens is what
# keeps them the appliance's.
DOCKER_NETWORK_MODE = "host"

MEMLOCK_UNLIMITED = ("memlock", -1, -1)
STACK_64MIB = ("stack", 67108864, 67108864)

# Environment passed through to the engine as is: the simulator's knobs (demo mode and tests).
PASSTHROUGH_ENV_PREFIXES = ("STEP_SIM_",)
# Environment that does not change what runs, so it stays out of the settings hash.
_UNHASHED_ENV = ("HF_HUB_OFFLINE", "HF_TOKEN", *PASSTHROUGH_ENV_PREFIXES)


@dataclass(frozen=True)
class Mount:
    source: str  # host path
    target: str  # path inside the container
    read_only: bool = False


@dataclass(frozen=True)
class LaunchSpec:
    """Everything needed to run the engine once. Frozen: a retry builds a new one."""

    name: str
    image: str
    args: tuple[str, ...]  # after `vllm serve`: model first, then flags
    profile: str
    served_model_name: str
    host_port: int
    runtime: str = "docker"
    host_ip: str = "127.0.0.1"
    container_port: int = 0  # vLLM's port inside the container (the same number as host_port)
    env: tuple[tuple[str, str], ...] = ()
    secret_env: tuple[tuple[str, str], ...] = field(default=(), repr=False)
    mounts: tuple[Mount, ...] = ()
    gpus: tuple[str, ...] | None = None  # None: no GPU request; (): all GPUs; else UUIDs
    ipc_mode: str = "host"
    ulimits: tuple[tuple[str, int, int], ...] = (MEMLOCK_UNLIMITED, STACK_64MIB)
    labels: tuple[tuple[str, str], ...] = ()
    executable: tuple[str, ...] = ()  # process runtime: the program that takes `args`
    weights_repo: str = ""  # a Hub repo to download before starting; "" when local
    hf_cache: str = ""  # host folder of the HF cache (holds hub/)
    settings_hash: str = ""
    network_mode: str = ""  # docker: "host" (vLLM on 127.0.0.1 of the host); "": Docker's bridge
    hf_token: str = field(default="", repr=False)  # for the appliance's download; see engine_env
    engine_key: str = field(default="", repr=False)  # this start's key (with_engine_key)
    engine_key_dir: str = ""  # host folder holding the key file, mounted at ENGINE_KEY_DIR
    socket_dir: str = ""  # host folder of vLLM's Unix socket (endpoint.py); "" when on TCP

    @property
    def model(self) -> str:
        return self.args[0] if self.args else ""

    @property
    def label_map(self) -> dict[str, str]:
        return dict(self.labels)

    @property
    def env_map(self) -> dict[str, str]:
        """The engine's environment, secrets included (never print this)."""
        return dict(self.env) | dict(self.secret_env)

    @property
    def engine_url(self) -> str:
        if self.socket_dir:
            return endpoint.socket_url(Path(self.socket_dir) / endpoint.SOCKET_NAME)
        return f"http://{self.host_ip}:{self.host_port}"

    @property
    def container_network(self) -> str:
        """Docker's network mode for this start: on the socket, none at all, or Docker's default
        bridge with nothing published when the engine must download its weights itself; on TCP,
        the host's (vLLM on 127.0.0.1)."""
        if not self.socket_dir:
            return DOCKER_NETWORK_MODE
        return "bridge" if self.engine_fetches_weights else "none"

    @property
    def engine_fetches_weights(self) -> bool:
        """Whether the engine itself may download from the Hub (and so needs the HF token): not
        when the appliance downloads first (it then runs the engine with HF_HUB_OFFLINE=1), nor
        for a local checkpoint."""
        if self.weights_repo or dict(self.env).get("HF_HUB_OFFLINE") == "1":
            return False
        return not self.model.startswith("/")

    def arg_value(self, flag: str) -> str | None:
        """The value following `flag` in args (None when absent)."""
        for i, arg in enumerate(self.args):
            if arg == flag and i + 1 < len(self.args):
                return self.args[i + 1]
            if arg.startswith(flag + "="):
                return arg.split("=", 1)[1]
        return None

    def with_arg(self, flag: str, value: str) -> LaunchSpec:
        """A copy with `flag value` set (replaced when present, appended otherwise)."""
        args = list(self.args)
        for i, arg in enumerate(args):
            if arg == flag and i + 1 < len(args):
                args[i + 1] = value
                return dataclasses.replace(self, args=tuple(args))
            if arg.startswith(flag + "="):
                args[i] = f"{flag}={value}"
                return dataclasses.replace(self, args=tuple(args))
        return dataclasses.replace(self, args=(*args, flag, value))

    def with_env(self, **values: str) -> LaunchSpec:
        env = dict(self.env) | values
        secret = self.secret_env
        if env.get("HF_HUB_OFFLINE") == "1":  # an offline engine never needs the token
            secret = tuple((k, v) for k, v in secret if k != "HF_TOKEN")
        return dataclasses.replace(self, env=tuple(sorted(env.items())), secret_env=secret)

    def with_engine_key(self, key: EngineKey) -> LaunchSpec:
        """This start's key, given to the engine without showing it: in a container through the
        key folder mounted read-only (the runtime's entrypoint reads it into VLLM_API_KEY), as a
        process through its environment (never argv). The container carries only the key's id."""
        labels = dict(self.labels) | {LABEL_ENGINE_KEY_ID: key.id}
        changes: dict[str, Any] = {
            "engine_key": key.secret,
            "labels": tuple(sorted(labels.items())),
        }
        if self.runtime == "docker":
            mount = Mount(str(key.folder), ENGINE_KEY_DIR, read_only=True)
            changes["mounts"] = (*self.mounts, mount)
            changes["engine_key_dir"] = str(key.folder)
        else:
            secret = dict(self.secret_env) | {"VLLM_API_KEY": key.secret}
            if self.engine_fetches_weights and self.hf_token:
                secret["HF_TOKEN"] = self.hf_token
            changes["secret_env"] = tuple(sorted(secret.items()))
        return dataclasses.replace(self, **changes)

    def display_command(self) -> list[str]:
        """The program and its arguments as they will run, for logs and `plan`."""
        return [*self.executable, *self.args] if self.executable else ["vllm", "serve", *self.args]


# --------------------------------------------------------------------------------- pure helpers


def listen_host(engine: EngineSettings, runtime: str) -> str:
    """Where vLLM listens: the configured loopback host (127.0.0.1), as a local process and in a
    container alike, since the container shares the host's network (DOCKER_NETWORK_MODE).

    Never beyond loopback: the engine's unguarded routes (see docs/security.md) must not
    face the LAN, and the appliance itself reaches it on 127.0.0.1; any other `engine.host` is
    replaced by 127.0.0.1."""
    del runtime
    try:
        loopback = ipaddress.ip_address(engine.host).is_loopback
    except ValueError:
        loopback = engine.host == "localhost"
    return engine.host if loopback else "127.0.0.1"


def hf_cache_root(engine: EngineSettings) -> Path:
    """Host folder of the Hugging Face cache that is mounted into the container."""
    if engine.hf_cache_dir:
        return Path(engine.hf_cache_dir).expanduser()
    if os.environ.get("STEP_STATION_HOME"):
        return st.cache_dir() / "huggingface"
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser()
    return Path.home() / ".cache" / "huggingface"


def compile_cache_root() -> Path:
    """Host folder holding vLLM / FlashInfer / Triton compile caches (faster second start)."""
    return st.cache_dir() / "compile"


def is_local_model(model: str) -> bool:
    return model.startswith(("/", "./", "~")) and Path(model).expanduser().exists()


def settings_hash(
    *,
    image: str,
    args: Sequence[str],
    gpus: tuple[str, ...] | None,
    port: int,
    env: Mapping[str, str],
) -> str:
    """Short hash of what decides how the engine runs; a running engine whose label differs
    from the current settings needs a restart."""
    hashed_env = {k: v for k, v in env.items() if not k.startswith(_UNHASHED_ENV)}
    payload = {
        "image": image,
        "args": list(args),
        "gpus": list(gpus) if gpus is not None else None,
        "port": port,
        "env": hashed_env,
    }
    text = json.dumps(payload, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _docker_mounts(hf_root: Path, compile_root: Path) -> tuple[Mount, ...]:
    return (
        Mount(str(hf_root), f"{CONTAINER_HOME}/.cache/huggingface"),
        Mount(str(compile_root / "vllm"), f"{CONTAINER_HOME}/.cache/vllm"),
        Mount(str(compile_root / "flashinfer"), f"{CONTAINER_HOME}/.cache/flashinfer"),
        Mount(str(compile_root / "triton"), f"{CONTAINER_HOME}/.triton"),
    )


def build_launch_spec(
    engine: EngineSettings,
    *,
    profile: str,
    served_model_name: str,
    vllm_args: Sequence[str],
    engine_env: Mapping[str, str] | None = None,
    runtime: str | None = None,
    gpu_uuid: str = "",
    gpu_uuids: Sequence[str] = (),
    hf_token: str = "",
    executable: Sequence[str] = (),
    environ: Mapping[str, str] | None = None,
    download_weights: bool = True,
    tuning: EngineTuning | None = None,
) -> LaunchSpec:
    """The frozen spec for one start. Pure apart from reading paths from settings.

    `vllm_args` comes from `profiles.build_vllm_args(profile, engine, listen_host=...)` and
    `engine_env` from `profiles.engine_environment(profile, engine)`.
    `engine.model_override` replaces the model: a local path is mounted read-only, a repo id is
    downloaded like the profile's checkpoint.
    `tuning` (moe_folder.tuning_for_start) adds the tuned MoE config setting and, in a container,
    the folder's read-only mount.
    """
    runtime = runtime or engine.runtime
    environ = os.environ if environ is None else environ
    args = list(vllm_args)
    hf_root = hf_cache_root(engine)
    compile_root = compile_cache_root()
    mounts: tuple[Mount, ...] = ()
    model = engine.model_override or (args[0] if args else "")
    local = is_local_model(model)
    socket = endpoint.uses_socket(engine)
    socket_dir = str(endpoint.socket_dir(engine.container_name)) if socket else ""
    if runtime == "docker":
        mounts = _docker_mounts(hf_root, compile_root)
        if socket:
            mounts = (*mounts, Mount(socket_dir, endpoint.CONTAINER_SOCKET_DIR))
        if local:
            host_path = str(Path(model).expanduser().resolve())
            target = f"/models/{Path(host_path).name}"
            mounts = (*mounts, Mount(host_path, target, read_only=True))
            model = target
    if args:
        args[0] = model
    if "--allowed-origins" not in args and not any(
        a.startswith("--allowed-origins=") for a in args
    ):
        args += ["--allowed-origins", CLOSED_ORIGINS]
    env: dict[str, str] = {}
    if runtime != "docker":
        env["HF_HOME"] = str(hf_root)
    env.update(engine_env or {})
    if tuning is not None:
        # In the hashed env: an engine started before the configs were installed shows as
        # needing a restart, which is what it needs to use them.
        env.update(tuning.env)
        if runtime == "docker":
            mounts = (
                *mounts,
                *(Mount(str(m.host), m.container, m.read_only) for m in tuning.mounts),
            )
    env.update({k: v for k, v in environ.items() if k.startswith(PASSTHROUGH_ENV_PREFIXES)})
    gpus: tuple[str, ...] | None = None
    if runtime == "docker" and engine.request_gpu:
        if len(gpu_uuids) > 1:  # tensor/data parallel: exactly these GPUs, by UUID
            gpus = tuple(gpu_uuids)
        else:
            uuid = engine.gpu_uuid or (gpu_uuids[0] if gpu_uuids else gpu_uuid)
            gpus = (uuid,) if uuid else ()
    # memlock/stack limits are for CUDA pinned memory and NCCL; without a GPU (the simulator on a
    # machine without the NVIDIA runtime) they are moot, and a daemon whose own hard limit is
    # lower refuses to start the container with them ("error setting rlimit").
    ulimits = (MEMLOCK_UNLIMITED, STACK_64MIB) if gpus is not None else ()
    port = 0 if socket else engine.port
    digest = settings_hash(image=engine.image, args=args, gpus=gpus, port=port, env=env)
    labels = {
        LABEL_MANAGED: "true",
        LABEL_NAME: engine.container_name,
        LABEL_PROFILE: profile,
        LABEL_SETTINGS_HASH: digest,
        LABEL_PORT: str(engine.port),
        LABEL_SERVED_NAME: served_model_name,
    }
    weights_repo = "" if (local or not download_weights) else model
    # The HF token reaches the engine only when the engine itself downloads (no appliance
    # download first): as a process through its environment here, in a container through the
    # private key folder (`engine_key.issue(..., hf_token=)`), never in `docker inspect`.
    engine_downloads = not weights_repo and not local and runtime != "docker"
    return LaunchSpec(
        name=engine.container_name,
        image=engine.image,
        args=tuple(args),
        profile=profile,
        served_model_name=served_model_name,
        host_port=engine.port,
        runtime=runtime,
        host_ip="127.0.0.1",
        container_port=engine.port,
        env=tuple(sorted(env.items())),
        secret_env=(("HF_TOKEN", hf_token),) if hf_token and engine_downloads else (),
        mounts=mounts,
        gpus=gpus,
        ulimits=ulimits,
        labels=tuple(sorted(labels.items())),
        executable=tuple(executable),
        weights_repo=weights_repo,
        hf_cache=str(hf_root),
        settings_hash=digest,
        network_mode=DOCKER_NETWORK_MODE if runtime == "docker" and not socket else "",
        hf_token=hf_token,
        socket_dir=socket_dir,
    )


def safer_spec(
    spec: LaunchSpec, failure: str, facts: Mapping[str, Any] | None = None
) -> tuple[LaunchSpec, str] | None:
    """One step safer after an out-of-memory start, with a sentence saying what changed.

    The KV cache not holding the requested context lowers `--max-model-len` (to vLLM's own
    estimate when it printed one, else half); any other CUDA out-of-memory lowers
    `--gpu-memory-utilization` by 0.05 (more room for activations and CUDA graphs). None when
    nothing safer is left to try.
    """
    facts = facts or {}
    if failure == phases.MAX_LEN_TOO_LARGE:
        current = spec.arg_value("--max-model-len")
        was = int(current) if current and current.isdigit() else int(facts.get("model_max_len", 0))
        estimate = int(facts.get("estimated_max_model_len", 0))
        new_len = (estimate // 1024) * 1024 if estimate >= 1024 else was // 2
        if new_len <= 0 or (was and new_len >= was):
            return None
        note = f"--max-model-len {new_len}" + (f" (was {was})" if was else "")
        return spec.with_arg("--max-model-len", str(new_len)), note
    current = spec.arg_value("--gpu-memory-utilization")
    value = float(current) if current else 0.9  # vLLM's default
    lowered = round(value - 0.05, 2)
    if lowered < 0.5:
        return None
    note = f"--gpu-memory-utilization {lowered:.2f} (was {value:.2f})"
    return spec.with_arg("--gpu-memory-utilization", f"{lowered:.2f}"), note
