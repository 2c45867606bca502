"""The only module that imports docker (docker-py).

`DockerRuntime` runs the engine as a container: pulls with per-layer byte progress (errors
checked on every event), creates the container from the frozen launch spec, streams its logs
split on `\r` and `\n`, stops it with SIGTERM then kill, and finds it again by its labels.
`docker_probe()` is the doctor's read-only look at the Docker engine.

`docker.client`, `docker.types` and `docker.errors` are imported as submodules: the repository's
own `docker/` folder (Dockerfiles) would otherwise shadow the package for mypy.
"""

from __future__ import annotations

import contextlib
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import docker.client
import docker.errors
import docker.types
import requests.exceptions

from appliance.engine import engine_key
from appliance.engine.compat import FlagCheckUnavailable
from appliance.engine.runtime import (
    EngineExit,
    EngineHandle,
    LogLine,
    ProgressCallback,
    Runtime,
    split_lines,
)
from appliance.engine.spec import ENGINE_KEY_DIR, LABEL_MANAGED, LABEL_NAME, LaunchSpec
from appliance.errors import (
    DockerUnavailableError,
    EngineError,
    ImagePullError,
    PortInUseError,
)
from appliance.units import fmt_progress

T = TypeVar("T")
LABEL_PROBE = "io.step-station.probe"  # throwaway containers (the flag check); never the engine

# The engine container's entrypoint when it has a key: a POSIX shell reads the key (and, only when
# the engine downloads itself, the HF token) from the read-only key folder into the environment,
# then execs the image's own entrypoint (`vllm serve`) with the spec's arguments. The secrets are
# thus in no `docker inspect` field and on no command line. No key file, no engine: an engine
# without its key must not serve unprotected. `umask 007`: the Unix socket vLLM creates in the
# setgid socket folder is then the owner's group's to connect to (appliance/endpoint.py); it also
# keeps what the engine writes into the mounted caches from others.
KEY_ENTRYPOINT_SCRIPT = (
    "umask 007; "
    f'k="{ENGINE_KEY_DIR}/{engine_key.KEY_FILE}"; '
    'IFS= read -r VLLM_API_KEY < "$k" && [ -n "$VLLM_API_KEY" ] || '
    '{ echo "step-station: cannot read the engine key $k; refusing to serve without it" >&2; '
    "exit 78; }; export VLLM_API_KEY; "
    f't="{ENGINE_KEY_DIR}/{engine_key.HF_TOKEN_FILE}"; '
    'if [ -f "$t" ]; then IFS= read -r HF_TOKEN < "$t"; export HF_TOKEN; fi; '
    'exec "$@"'
)


@dataclass(frozen=True)
class DockerProbe:
    """What the doctor needs to know about the local Docker engine."""

    version: str  # engine version, e.g. "20.10.24"
    api_version: str
    runtimes: list[str] = field(default_factory=list)  # e.g. ["io.containerd.runc.v2", "nvidia"]
    default_runtime: str = ""
    cdi_spec_dirs: list[str] = field(default_factory=list)  # where the daemon looks for CDI specs
    root_dir: str = ""  # where images are stored (DockerRootDir)


def docker_probe(timeout: float = 3.0) -> DockerProbe:
    """Version and runtimes of the Docker engine at DOCKER_HOST (or the default socket).

    Raises DockerUnavailableError, saying what to do, when the engine cannot be reached.
    """
    try:
        client = docker.client.from_env(timeout=int(max(1, timeout)))
    except docker.errors.DockerException as err:
        raise DockerUnavailableError(
            f"Docker is not reachable ({err}).",
            hint="Start it (`sudo systemctl start docker`) or check DOCKER_HOST.",
        ) from err
    try:
        version = client.version()
        info = client.info()
    except (docker.errors.DockerException, requests.exceptions.RequestException) as err:
        raise DockerUnavailableError(
            f"Docker did not answer ({err}).",
            hint="Check that the Docker engine is running: `sudo systemctl status docker`.",
        ) from err
    finally:
        client.close()
    return DockerProbe(
        version=str(version.get("Version", "?")),
        api_version=str(version.get("ApiVersion", "?")),
        runtimes=sorted((info.get("Runtimes") or {}).keys()),
        default_runtime=str(info.get("DefaultRuntime", "")),
        cdi_spec_dirs=[str(d) for d in (info.get("CDISpecDirs") or [])],
        root_dir=str(info.get("DockerRootDir", "")),
    )


# ------------------------------------------------------------------------------ the runtime

PULL_STALL_S = 120.0  # a pull gaining no byte for this long is abandoned with a clear error
_GPU_DRIVER_HINT = (
    "Set up the NVIDIA Container Toolkit: `sudo nvidia-ctk runtime configure --runtime=docker "
    "&& sudo systemctl restart docker`. On a machine without an NVIDIA GPU, run with "
    "`step-station config set engine.request_gpu false` (the simulator image only)."
)
_TIMESTAMP = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(\.\d+)?(Z|[+-]\d\d:\d\d) ")


def parse_docker_time(text: str) -> float | None:
    """Docker's RFC 3339 times (nanoseconds, `Z`) as epoch seconds; None for the zero time."""
    match = re.match(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(\.\d+)?(Z|[+-]\d\d:\d\d)?$", text or "")
    if not match or text.startswith("0001-"):
        return None
    base, frac, zone = match.group(1), match.group(2) or "", match.group(3) or "Z"
    zone = "+00:00" if zone == "Z" else zone
    stamp = datetime.fromisoformat(base + zone).timestamp()
    return stamp + (float(frac) if frac else 0.0)


def split_timestamped(message: str) -> tuple[float | None, str]:
    """`2024-05-01T10:00:00.123456789Z text` -> (epoch seconds, text)."""
    match = _TIMESTAMP.match(message)
    if not match:
        return None, message
    return parse_docker_time(match.group(0).strip()), message[match.end() :]


def _unavailable(err: Exception) -> DockerUnavailableError:
    return DockerUnavailableError(
        f"Docker is not reachable ({err.__class__.__name__}: {err}).",
        hint="Start it (`sudo systemctl start docker`) or check DOCKER_HOST.",
    )


class DockerRuntime(Runtime):
    """The engine as a container of the local Docker engine (docker-py)."""

    kind = "docker"

    def __init__(
        self,
        base_url: str | None = None,
        timeout_s: int = 60,
        pull_stall_s: float = PULL_STALL_S,
        platform: str | None = None,
    ) -> None:
        self._base_url = base_url
        self.pull_stall_s = pull_stall_s
        self._platform = platform  # None: the Docker engine's own (linux/arm64 on a Station)
        self._timeout_s = timeout_s
        self._client: Any = None
        self._lock = threading.Lock()

    # ---------------------------------------------------------------------------- client

    @property
    def client(self) -> Any:
        with self._lock:
            if self._client is None:
                try:
                    if self._base_url:
                        client = docker.client.DockerClient(
                            base_url=self._base_url, timeout=self._timeout_s
                        )
                    else:
                        client = docker.client.from_env(timeout=self._timeout_s)
                    client.ping()
                except (docker.errors.DockerException, requests.exceptions.RequestException) as e:
                    raise _unavailable(e) from e
                self._client = client
            return self._client

    def new_client(self, timeout_s: int | None = None) -> Any:
        """A separate client (its own connection), e.g. for a long pull that may be abandoned."""
        timeout = timeout_s or self._timeout_s
        try:
            if self._base_url:
                return docker.client.DockerClient(base_url=self._base_url, timeout=timeout)
            return docker.client.from_env(timeout=timeout)
        except (docker.errors.DockerException, requests.exceptions.RequestException) as err:
            raise _unavailable(err) from err

    def _reset(self) -> None:
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(Exception):
                client.close()

    def _call(self, fn: Callable[[], T]) -> T:
        """Run a Docker call; a lost connection becomes DockerUnavailableError (and reconnects
        on the next call)."""
        try:
            return fn()
        except (requests.exceptions.ConnectionError, requests.exceptions.Timeout) as err:
            self._reset()
            raise _unavailable(err) from err
        except docker.errors.DockerException as err:
            if isinstance(err, docker.errors.APIError):
                raise
            self._reset()
            raise _unavailable(err) from err

    def close(self) -> None:
        self._reset()

    # ---------------------------------------------------------------------------- images

    def image_present(self, spec: LaunchSpec) -> bool:
        return self.has_image(spec.image)

    def has_image(self, ref: str) -> bool:
        try:
            self._call(lambda: self.client.images.get(ref))
        except docker.errors.APIError:  # ImageNotFound included
            return False
        return True

    def ensure_image(self, spec: LaunchSpec, on_progress: ProgressCallback) -> None:
        self.check_platform(spec.image)
        pull_image(self, spec.image, on_progress, stall_s=self.pull_stall_s)

    def host_platform(self) -> str:
        """`os/arch` the Docker engine runs images for, e.g. linux/arm64 on a DGX Station."""
        if self._platform:
            return self._platform
        info = self._call(self.client.info)
        arch = str(info.get("Architecture", ""))
        arch = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm/v7"}.get(arch, arch)
        return f"{info.get('OSType') or 'linux'}/{arch}"

    def check_platform(self, ref: str) -> None:
        """ImagePullError before any byte is pulled when the registry's `ref` has no variant for
        this machine (Docker's own pull would fail minutes later with a generic message).

        Asks the registry through the Docker engine (the distribution inspect API): an
        unreachable registry or a missing tag fails here the way the pull would; any other
        answer leaves the verdict to the pull.
        """
        platform = self.host_platform()
        try:
            data = self._call(lambda: self.client.images.get_registry_data(ref))
        except docker.errors.APIError as err:
            reason = _explain(err)
            lowered = reason.lower()
            if isinstance(err, docker.errors.NotFound) or any(
                word in lowered for word in ("connection refused", "no such host", "dial tcp")
            ):
                raise _pull_error(ref, reason) from err
            return
        platforms = data.attrs.get("Platforms") or []
        if not platforms or platform_offered(platform, platforms):
            return  # a registry that names no platform: the pull decides
        offered = ", ".join(_platform_names(data.attrs.get("Platforms") or [])) or "none listed"
        raise ImagePullError(
            f"The image {ref} has no {platform} variant (it offers: {offered}), so this machine "
            "cannot run it; nothing was pulled.",
            hint=f"Use a tag built for {platform} (`step-station config set engine.image "
            "IMAGE`); on a DGX Station that is an arm64 (or multi-arch) build of the vLLM image.",
        )

    def image_digest(self, ref: str) -> str:
        """The local image's id (`sha256:` of its config): the same bytes, the same id."""
        try:
            image = self._call(lambda: self.client.images.get(ref))
        except docker.errors.APIError as err:
            raise ImagePullError(
                f"The engine image {ref} is not on this machine.",
                hint="Pull it with `step-station pull`.",
            ) from err
        return str(image.id)

    def serve_help(
        self, ref: str, timeout_s: float, labels: Mapping[str, str] | None = None
    ) -> tuple[int, str]:
        """(exit code, stdout) of the image's entrypoint (`vllm serve`) with `--help=all`, in a
        throwaway container without network or GPU, removed afterwards (`labels`: extra labels
        for it, e.g. a test's own)."""
        container = self._call(
            lambda: self.client.containers.create(
                image=ref,
                command=["--help=all"],
                detach=True,
                network_disabled=True,
                environment={"COLUMNS": "200"},  # one option per line, whatever the default
                labels={**(labels or {}), LABEL_PROBE: "flags"},
            )
        )
        try:
            self._call(container.start)
            try:
                result = container.wait(timeout=max(1, int(timeout_s)))
            except (requests.exceptions.ConnectionError, requests.exceptions.Timeout) as err:
                raise FlagCheckUnavailable(
                    f"`vllm serve --help=all` ran past {timeout_s:.0f} s"
                ) from err
            code = int(result.get("StatusCode", -1))
            out = self._call(lambda: container.logs(stdout=True, stderr=code != 0))
            return code, out.decode("utf-8", "replace")
        except docker.errors.APIError as err:
            raise FlagCheckUnavailable(f"Docker could not run it: {_explain(err)}") from err
        finally:
            with contextlib.suppress(docker.errors.DockerException, requests.RequestException):
                container.remove(force=True)

    # ------------------------------------------------------------------------ containers

    def _handle(self, container: Any) -> EngineHandle:
        state = container.attrs.get("State") or {}
        return EngineHandle(
            id=container.id,
            name=container.name,
            labels=dict(container.labels or {}),
            started_at=parse_docker_time(str(state.get("StartedAt", ""))),
        )

    def find(self, name: str) -> EngineHandle | None:
        filters = {"label": [f"{LABEL_MANAGED}=true", f"{LABEL_NAME}={name}"]}
        found = self._call(lambda: self.client.containers.list(all=True, filters=filters))
        if not found:
            return None
        running = [c for c in found if c.status == "running"]
        return self._handle((running or found)[0])

    def create(self, spec: LaunchSpec) -> EngineHandle:
        """Create (not start) the container from the spec; its spec can then be inspected."""
        for mount in spec.mounts:
            if not mount.read_only:
                Path(mount.source).mkdir(parents=True, exist_ok=True)
        entrypoint: list[str] | None = None
        if spec.engine_key_dir:
            entrypoint = self._image_entrypoint(spec.image)
        kwargs = container_kwargs(spec, image_entrypoint=entrypoint)
        try:
            container = self._call(lambda: self.client.containers.create(**kwargs))
        except docker.errors.ImageNotFound as err:
            raise ImagePullError(
                f"The engine image {spec.image} is not on this machine.",
                hint="Pull it with `step-station pull`.",
            ) from err
        except docker.errors.APIError as err:
            if err.status_code == 409:
                raise EngineError(
                    f"A container named {spec.name!r} already exists and step-station does not "
                    "manage it.",
                    hint=f"Remove it (`docker rm -f {spec.name}`) or choose another name with "
                    "`step-station config set engine.container_name NAME`.",
                ) from err
            raise EngineError(
                f"Docker refused to create the engine container: {_explain(err)}"
            ) from err
        return self._handle(container)

    def _image_entrypoint(self, ref: str) -> list[str]:
        """The image's own entrypoint (`vllm serve` for vllm/vllm-openai), which the key
        entrypoint execs."""
        try:
            image = self._call(lambda: self.client.images.get(ref))
        except docker.errors.ImageNotFound as err:
            raise ImagePullError(
                f"The engine image {ref} is not on this machine.",
                hint="Pull it with `step-station pull`.",
            ) from err
        config = image.attrs.get("Config") or {}
        return [str(part) for part in config.get("Entrypoint") or []]

    def launch(self, spec: LaunchSpec) -> EngineHandle:
        handle = self.create(spec)
        container = self._call(lambda: self.client.containers.get(handle.id))
        try:
            self._call(container.start)
        except docker.errors.APIError as err:
            with contextlib.suppress(docker.errors.DockerException):
                container.remove(force=True)
            raise _start_error(err, spec) from err
        container.reload()
        return self._handle(container)

    def _container(self, handle: EngineHandle) -> Any:
        return self._call(lambda: self.client.containers.get(handle.id))

    def inspect(self, handle: EngineHandle) -> EngineExit:
        try:
            container = self._container(handle)
        except docker.errors.NotFound:
            return EngineExit(running=False, gone=True)
        state = container.attrs.get("State") or {}
        status = str(state.get("Status", ""))
        if status in ("running", "restarting", "paused"):
            return EngineExit(running=True)
        return EngineExit(
            running=False,
            exit_code=int(state["ExitCode"]) if status == "exited" else None,
            oom_killed=bool(state.get("OOMKilled")),
            error=str(state.get("Error") or ""),
        )

    def follow_logs(
        self, handle: EngineHandle, stop: threading.Event, since: float | None = None
    ) -> Iterator[LogLine]:
        options: dict[str, Any] = {"stream": True, "follow": True, "timestamps": True}
        if since is not None:
            options["since"] = since
        try:
            container = self._container(handle)
            stream = self._call(lambda: container.logs(**options))
        except docker.errors.NotFound:
            return
        done = threading.Event()

        def closer() -> None:  # the stream blocks on a socket: close it when asked to stop
            while not stop.wait(0.5):
                if done.is_set():
                    return
            with contextlib.suppress(Exception):
                stream.close()

        threading.Thread(target=closer, name="engine-logs-closer", daemon=True).start()
        try:
            pending = ""
            for chunk in stream:
                pending += chunk.decode("utf-8", "replace")
                *messages, pending = pending.split("\n")
                for message in messages:
                    yield from _log_lines(message)
            if pending:
                yield from _log_lines(pending)
        except (requests.exceptions.RequestException, docker.errors.DockerException) as err:
            raise _unavailable(err) from err
        finally:
            done.set()

    def tail(self, handle: EngineHandle, lines: int = 50) -> list[str]:
        try:
            container = self._container(handle)
            raw = self._call(lambda: container.logs(tail=lines * 4))
        except docker.errors.NotFound:
            return []
        found, rest = split_lines(raw.decode("utf-8", "replace") + "\n")
        del rest
        return found[-lines:]

    def stop(self, handle: EngineHandle, timeout_s: float) -> None:
        """Docker sends SIGTERM, waits `timeout_s`, then SIGKILL; returns once it exited."""
        try:
            container = self._container(handle)
            self._call(lambda: container.stop(timeout=max(1, int(timeout_s))))
            self._call(lambda: container.wait(timeout=int(timeout_s) + 30))
        except docker.errors.NotFound:
            return

    def remove(self, handle: EngineHandle) -> None:
        try:
            container = self._container(handle)
            self._call(lambda: container.remove(force=True))
        except docker.errors.NotFound:
            engine_key.discard(handle.name, handle.labels)
            return
        except docker.errors.APIError as err:
            if err.status_code != 409:  # 409: removal already in progress
                raise EngineError(
                    f"Could not remove the engine container: {_explain(err)}"
                ) from err
        engine_key.discard(handle.name, handle.labels)

    def engine_pids(self, container_id: str) -> set[int]:
        """Host PIDs of the processes in the engine's container (`docker top`). NVML lists host
        PIDs, so this is how the dashboard labels the engine's GPU memory as the engine's."""
        try:
            container = self._call(lambda: self.client.containers.get(container_id))
            top = self._call(container.top)
        except docker.errors.APIError:  # gone, or not running
            return set()
        titles = list(top.get("Titles") or [])
        if "PID" not in titles:
            return set()
        column = titles.index("PID")
        return {int(row[column]) for row in top.get("Processes") or [] if row[column].isdigit()}


_ARCH_ALIASES = {"x86_64": "amd64", "x86-64": "amd64", "aarch64": "arm64", "armhf": "arm"}


def _platform_key(os_name: str, arch: str, variant: str) -> tuple[str, str, str]:
    """(os, arch, variant) the way the OCI image index means them: aarch64 is arm64, and arm64's
    only variant v8 is the same as none (Docker Hub's index says arm64/v8, buildx's says arm64)."""
    arch = _ARCH_ALIASES.get(arch.lower(), arch.lower())
    variant = variant.lower()
    if arch == "arm64" and variant in ("8", "v8", "v8.0"):
        variant = ""
    return os_name.lower(), arch, variant


def platform_offered(host: str, platforms: list[Any]) -> bool:
    """True when one of the registry's `platforms` (the distribution inspect answer's
    `Platforms`: dicts with os, architecture, variant) runs on `host` (`os/arch[/variant]`).

    Not docker-py's RegistryData.has_platform: it compares whole dicts, so a Station
    (linux/arm64) would be told that an index listing linux/arm64/v8 has no build for it.
    """
    parts = host.split("/")
    want = _platform_key(parts[0], parts[1] if len(parts) > 1 else "", "/".join(parts[2:]))
    for entry in platforms:
        have = _platform_key(
            str(entry.get("os", "")),
            str(entry.get("architecture", "")),
            str(entry.get("variant") or ""),
        )
        # A host without a variant runs any variant of its arch (linux/arm -> arm/v7 or v6).
        if have[:2] == want[:2] and (not want[2] or have[2] in ("", want[2])):
            return True
    return False


def _platform_names(platforms: list[Any]) -> list[str]:
    names = []
    for p in platforms:
        name = f"{p.get('os', '?')}/{p.get('architecture', '?')}"
        names.append(f"{name}/{p['variant']}" if p.get("variant") else name)
    return sorted(set(names))


def _log_lines(message: str) -> Iterator[LogLine]:
    at, text = split_timestamped(message)
    for line in text.split("\r"):
        if line.strip():
            yield LogLine(line, at)


def _explain(err: Any) -> str:
    return str(getattr(err, "explanation", None) or err)


def _start_error(err: Any, spec: LaunchSpec) -> Exception:
    text = _explain(err)
    if "could not select device driver" in text or "nvidia" in text.lower():
        return EngineError(
            f"Docker could not give the engine a GPU ({text}).", hint=_GPU_DRIVER_HINT
        )
    if "error setting rlimit" in text:
        return EngineError(
            f"Docker could not apply the engine's memlock/stack limits ({text}).",
            hint="Raise the Docker daemon's limits (LimitMEMLOCK=infinity in its systemd unit, "
            "then `sudo systemctl restart docker`).",
        )
    if "port is already allocated" in text or "address already in use" in text:
        return PortInUseError(
            f"Port {spec.host_port} on {spec.host_ip} is already in use ({text}).",
            hint="Stop the program using it, or choose another port with "
            "`step-station config set engine.port PORT`.",
        )
    return EngineError(f"Docker could not start the engine container: {text}")


def container_kwargs(spec: LaunchSpec, image_entrypoint: list[str] | None = None) -> dict[str, Any]:
    """docker-py `containers.create()` arguments for the spec (pure).

    With a key (`spec.engine_key_dir`), the entrypoint becomes the key-reading shell followed by
    `image_entrypoint`; the command stays exactly the spec's arguments."""
    device_requests = []
    if spec.gpus is not None:
        if spec.gpus:
            request = docker.types.DeviceRequest(device_ids=list(spec.gpus), capabilities=[["gpu"]])
        else:
            request = docker.types.DeviceRequest(count=-1, capabilities=[["gpu"]])
        device_requests.append(request)
    network: dict[str, Any]
    if spec.socket_dir:  # vLLM on the mounted socket: no network, or the bridge, nothing published
        network = {"network_mode": spec.container_network}
    elif spec.network_mode:
        network = {"network_mode": spec.network_mode}
    else:  # Docker's bridge: publish on loopback only
        network = {"ports": {f"{spec.container_port}/tcp": (spec.host_ip, spec.host_port)}}
    entry: dict[str, Any] = {}
    if spec.engine_key_dir:
        entry["entrypoint"] = [
            "/bin/sh",
            "-c",
            KEY_ENTRYPOINT_SCRIPT,
            "step-station-engine",
            *(image_entrypoint or []),
        ]
    # The container's environment never holds a secret (docker inspect shows it to anyone who
    # can reach the Docker socket): the key and the HF token travel through the key folder.
    environment = {k: v for k, v in spec.env_map.items() if k not in ("VLLM_API_KEY", "HF_TOKEN")}
    return {
        "image": spec.image,
        "command": list(spec.args),
        "name": spec.name,
        "detach": True,
        "labels": spec.label_map,
        "environment": environment,
        **entry,
        **network,
        "ipc_mode": spec.ipc_mode,
        "ulimits": [docker.types.Ulimit(name=n, soft=s, hard=h) for n, s, h in spec.ulimits],
        "mounts": [
            docker.types.Mount(target=m.target, source=m.source, type="bind", read_only=m.read_only)
            for m in spec.mounts
        ],
        "device_requests": device_requests or None,
    }


# ------------------------------------------------------------------------------------ pulls


def _split_ref(ref: str) -> tuple[str, str | None]:
    """`repo:tag` or `repo@sha256:...` -> (repo, tag-or-digest)."""
    if "@" in ref:
        repo, digest = ref.split("@", 1)
        return repo, digest
    last = ref.rsplit("/", 1)[-1]
    if ":" in last:
        repo, tag = ref.rsplit(":", 1)
        return repo, tag
    return ref, "latest"


_DONE_STATUSES = ("Download complete", "Pull complete", "Extracting", "Verifying Checksum")
_RETRYING = re.compile(r"Retrying in (\d+) seconds?")


class PullProgress:
    """Per-layer bytes from the pull stream: sum of `current` over sum of `total` of the
    Downloading events per layer id. A layer Docker resumes after a dropped connection reports
    the remaining bytes as its total; that is folded back into the layer's full size."""

    def __init__(self, ref: str) -> None:
        self.ref = ref
        self.layers: dict[str, list[int]] = {}  # layer id -> [bytes done, bytes total]
        self.complete: set[str] = set()
        self.seen: set[str] = set()
        self.note = ""

    @property
    def done(self) -> int:
        return sum(c for c, _ in self.layers.values())

    @property
    def total(self) -> int:
        return sum(t for _, t in self.layers.values())

    def line(self) -> str:
        text = f"{len(self.complete)}/{len(self.seen)} layers"
        return f"{text}; {self.note}" if self.note else text

    def take(self, event: dict[str, Any]) -> None:
        """Account one stream event; an in-band error (HTTP 200 all the same) raises."""
        if "errorDetail" in event or "error" in event:
            detail = event.get("errorDetail") or {}
            raise _pull_error(self.ref, str(detail.get("message") or event.get("error")))
        layer, status = event.get("id"), str(event.get("status", ""))
        if not layer or status.startswith("Pulling from"):
            return
        self.seen.add(layer)
        detail = event.get("progressDetail") or {}
        if status == "Downloading":
            self._downloading(layer, int(detail.get("current") or 0), int(detail.get("total") or 0))
        elif status.startswith(_DONE_STATUSES) and layer in self.layers:
            self.layers[layer][0] = self.layers[layer][1]
            self.complete.add(layer)
            self.note = ""
        elif status in ("Already exists", "Pull complete"):
            self.complete.add(layer)
        elif match := _RETRYING.match(status):
            self.note = f"the registry dropped the connection, Docker retries in {match.group(1)} s"

    def _downloading(self, layer: str, current: int, total: int) -> None:
        if total <= 0:  # containerd image store, or an unknown size: nothing to add up
            return
        known = self.layers.get(layer)
        if known is not None and total < known[1]:
            current += known[1] - total  # resumed: `total` is what was left
            total = known[1]
        self.layers[layer] = [min(current, total), total]
        self.note = ""


def pull_image(
    runtime: DockerRuntime,
    ref: str,
    on_progress: ProgressCallback,
    *,
    stall_s: float = PULL_STALL_S,
    clock: Callable[[], float] = time.monotonic,
) -> None:
    """Pull `ref` with per-layer byte progress, checking every event for an in-band error.

    A pull that shows no activity for `stall_s` (the registry went away mid-pull and Docker only
    counts down its retries, for minutes) is abandoned with a clear error and its connection
    closed; the layers Docker already has are kept for the next try. Nothing half-pulled is
    registered as the image.
    """
    repo, tag = _split_ref(ref)
    progress = PullProgress(ref)
    client = runtime.new_client(timeout_s=int(stall_s) + 1)
    try:
        stream = runtime._call(lambda: client.api.pull(repo, tag=tag, stream=True, decode=True))
        last_move = clock()
        for event in stream:
            progress.take(event)
            if _is_activity(event):
                last_move = clock()
            elif clock() - last_move > stall_s:
                raise ImagePullError(
                    f"Pulling {ref} made no progress for {stall_s:.0f} s "
                    f"({fmt_progress(progress.done, progress.total)}): the registry stopped "
                    "answering.",
                    hint="Check the network or the registry, then `step-station pull` again; "
                    "layers already fetched are kept.",
                )
            on_progress(progress.done, progress.total, progress.line())
    except (requests.exceptions.RequestException, docker.errors.DockerException) as err:
        if isinstance(err, docker.errors.APIError):
            raise _pull_error(ref, _explain(err)) from err
        if isinstance(err, requests.exceptions.ReadTimeout):
            raise ImagePullError(
                f"Pulling {ref}: Docker sent nothing for {stall_s:.0f} s.",
                hint="Check the network or the registry, then `step-station pull` again.",
            ) from err
        raise _unavailable(err) from err
    finally:
        with contextlib.suppress(Exception):
            client.close()
    if not runtime.has_image(ref):
        raise _pull_error(ref, "the pull ended but the image is not on this machine")
    total = progress.total
    on_progress(total, total, f"{len(progress.seen)}/{len(progress.seen)} layers, pulled")


def _is_activity(event: dict[str, Any]) -> bool:
    """Bytes moving or a layer changing state; not Docker's retry countdown or a wait."""
    status = str(event.get("status", ""))
    return not (_RETRYING.match(status) or status == "Waiting")


def _pull_error(ref: str, reason: str) -> ImagePullError:
    lowered = reason.lower()
    if "connection refused" in lowered or "no such host" in lowered or "dial tcp" in lowered:
        hint = "The registry cannot be reached: check the network (or that the registry runs), "
        hint += "then run `step-station pull` again; layers already fetched are kept."
    elif "not found" in lowered or "manifest unknown" in lowered:
        hint = "Check engine.image (`step-station config get engine.image`)."
    elif "unauthorized" in lowered or "denied" in lowered:
        hint = "Log in to the registry (`docker login`), then pull again."
    else:
        hint = "Run `step-station pull` again; layers already fetched are kept."
    return ImagePullError(f"Pulling {ref} failed: {reason}.", hint=hint)
