"""`step-station doctor`: is this machine ready to start the engine, and if not, what to run.

Each check answers pass / warn / fail with a detail and the one command that fixes it. A fail
means a start would fail. Fast and safe anywhere: no Docker and no GPU are answers, not crashes.
"""

from __future__ import annotations

import errno
import os
import shutil
import socket
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from appliance import endpoint, hardware, planner, profiles
from appliance.errors import DockerUnavailableError
from appliance.hardware import GB, GIB, Hardware
from appliance.settings import Settings
from appliance.units import fmt_bytes

PASS, WARN, FAIL = "pass", "warn", "fail"
IMAGE_BYTES = 20 * GIB  # vllm/vllm-openai images are ~20 GiB unpacked
DISK_MARGIN_BYTES = 10 * GIB  # below this much to spare after the download: warn
CDI_DIRS = ("/etc/cdi", "/var/run/cdi")
NVIDIA_CTK_FIX = (
    "sudo nvidia-ctk runtime configure --runtime=docker && sudo systemctl restart docker"
)


@dataclass(frozen=True)
class Check:
    name: str
    status: str  # pass | warn | fail
    detail: str
    fix: str = ""  # one command that fixes it; empty when there is nothing to do


@dataclass
class Report:
    checks: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """False when a failed check would stop a start."""
        return all(c.status != FAIL for c in self.checks)

    def check(self, name: str) -> Check:
        return next(c for c in self.checks if c.name == name)

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "checks": [asdict(c) for c in self.checks]}


@dataclass(frozen=True)
class DockerFacts:
    """What the doctor learned from Docker; `error` set when it is unreachable."""

    version: str = ""
    api_version: str = ""
    runtimes: tuple[str, ...] = ()
    cdi_spec_dirs: tuple[str, ...] = ()
    root_dir: str = ""
    error: str = ""


def probe_docker() -> DockerFacts:
    """Ask the local Docker engine (through the one module that imports docker)."""
    try:
        # Imported here: a missing docker package is a finding to report, not a crash, and
        # docker-py costs ~0.2 s to import, which checks that never ask Docker do not pay.
        from appliance.engine import docker_runtime
    except ImportError as err:
        return DockerFacts(error=f"the docker Python package is missing ({err})")
    try:
        probe = docker_runtime.docker_probe()
    except DockerUnavailableError as err:
        where = os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"
        return DockerFacts(error=f"{err.message.rstrip('.')}; DOCKER_HOST is {where}")
    return DockerFacts(
        version=probe.version,
        api_version=probe.api_version,
        runtimes=tuple(probe.runtimes),
        cdi_spec_dirs=tuple(probe.cdi_spec_dirs),
        root_dir=probe.root_dir,
    )


# ------------------------------------------------------------------------------------ checks


def check_docker(settings: Settings, facts: DockerFacts) -> Check:
    if settings.engine.runtime != "docker":
        return Check("docker", PASS, f"not needed (engine.runtime = {settings.engine.runtime})")
    if facts.error:
        return Check("docker", FAIL, facts.error, "sudo systemctl start docker")
    return Check("docker", PASS, f"Docker {facts.version} reachable (API {facts.api_version})")


# Docker releases whose port publishing lets other machines reach ports published on loopback:
# - before 28.0.0, a host on the same network segment that routes a container subnet via this
#   machine ("direct routing") reaches container ports, those published on 127.0.0.1 included
#   (moby/moby#45610; fixed in 28.0.0 by filtering direct-routed packets, epic moby/moby#48815);
# - 28.0.0 to 28.3.2: a firewalld reload removes that filtering, opening them again
#   (CVE-2025-54388, GHSA-x4rx-4gw3-53p4; fixed in 28.3.3 by moby/moby#50506).
DOCKER_DIRECT_ROUTING_FIXED = (28, 0, 0)
DOCKER_FIREWALLD_FIXED = (28, 3, 3)
DOCKER_UPGRADE_FIX = "sudo apt-get install --only-upgrade docker-ce docker-ce-cli"


def _version_tuple(text: str) -> tuple[int, int, int] | None:
    """`20.10.24+dfsg1` -> (20, 10, 24); None when it is not a version."""
    parts = text.split("+", 1)[0].split("-", 1)[0].split(".")[:3]
    if not all(p.isdigit() for p in parts):
        return None
    numbers = [int(p) for p in parts] + [0, 0]
    return numbers[0], numbers[1], numbers[2]


def check_docker_version(settings: Settings, facts: DockerFacts) -> Check:
    """Warn on a Docker release with a known way around loopback-only port publishing."""
    name = "docker-version"
    if settings.engine.runtime != "docker" or facts.error or not facts.version:
        return Check(name, PASS, "not checked (Docker not in use or not reachable)")
    version = _version_tuple(facts.version)
    if version is None:
        return Check(name, PASS, f"Docker {facts.version}: version not recognised, not checked")
    note = (
        " The engine itself uses the host's network on 127.0.0.1 and publishes nothing, but "
        "every other container's published ports are exposed this way."
    )
    if version < DOCKER_DIRECT_ROUTING_FIXED:
        return Check(
            name,
            WARN,
            f"Docker {facts.version} is older than 28.0.0: ports published on 127.0.0.1 can be "
            "reached from other machines on the same network that route to Docker's bridge "
            "(moby/moby#45610, fixed in 28.0.0); and 28.0.0-28.3.2 lose that fix on a firewalld "
            "reload (CVE-2025-54388, fixed in 28.3.3). Upgrade to 28.3.3 or newer." + note,
            DOCKER_UPGRADE_FIX,
        )
    if version < DOCKER_FIREWALLD_FIXED:
        return Check(
            name,
            WARN,
            f"Docker {facts.version}: after a firewalld reload, ports published on 127.0.0.1 "
            "can be reached from the local network (CVE-2025-54388, GHSA-x4rx-4gw3-53p4, fixed "
            "in 28.3.3). Upgrade to 28.3.3 or newer." + note,
            DOCKER_UPGRADE_FIX,
        )
    return Check(name, PASS, f"Docker {facts.version} has the known port-publishing fixes")


def _cdi_specs(dirs: Iterable[str]) -> list[str]:
    found: list[str] = []
    for folder in dirs:
        path = Path(folder)
        if not path.is_dir():
            continue
        for spec in sorted(path.iterdir()):
            try:
                if spec.suffix in {".yaml", ".yml", ".json"} and "nvidia.com" in spec.read_text(
                    errors="replace"
                ):
                    found.append(str(spec))
            except OSError:
                continue
    return found


def check_nvidia_runtime(
    settings: Settings, facts: DockerFacts, cdi_dirs: Iterable[str] = CDI_DIRS
) -> Check:
    engine = settings.engine
    if engine.runtime != "docker" or not engine.request_gpu:
        return Check(
            "nvidia-runtime",
            PASS,
            "not needed (no GPU is requested from Docker with these settings)",
        )
    dirs = list(dict.fromkeys([*cdi_dirs, *facts.cdi_spec_dirs]))
    specs = _cdi_specs(dirs)
    if "nvidia" in facts.runtimes:
        return Check("nvidia-runtime", PASS, "Docker has the NVIDIA runtime registered")
    if specs:
        return Check("nvidia-runtime", PASS, f"CDI spec for NVIDIA GPUs: {', '.join(specs)}")
    hook = shutil.which("nvidia-container-runtime-hook")
    if hook:
        return Check("nvidia-runtime", PASS, f"NVIDIA Container Toolkit hook at {hook}")
    if facts.error:
        return Check(
            "nvidia-runtime",
            WARN,
            f"could not ask Docker (not reachable); no CDI spec in {', '.join(dirs)} and no "
            "nvidia-container-runtime-hook on PATH",
            NVIDIA_CTK_FIX,
        )
    return Check(
        "nvidia-runtime",
        FAIL,
        "Docker has no NVIDIA runtime, no CDI spec for NVIDIA GPUs and no "
        "nvidia-container-runtime-hook: a GPU container cannot start (Docker says 'could not "
        'select device driver "" with capabilities: [[gpu]]\')',
        NVIDIA_CTK_FIX,
    )


def check_gpu(settings: Settings, hw: Hardware) -> Check:
    needed = settings.engine.request_gpu
    if not hw.gpus:
        return Check(
            "gpu",
            FAIL if needed else WARN,
            f"no NVIDIA GPU found ({hw.nvml_error or 'NVML found none'})"
            + ("" if needed else "; not needed with engine.request_gpu = false"),
            "nvidia-smi",
        )
    best = planner.rank_gpus(hw.gpus)
    listing = "; ".join(f"{g.uuid} {g.describe()}" for g in best)
    return Check("gpu", PASS, f"{listing}; driver {hw.driver_version or 'unknown'}")


def check_profile(settings: Settings, result: planner.Plan) -> Check:
    fit = result.chosen_fit
    if fit is not None:
        return Check(
            "profile",
            PASS,
            f"{fit.name} fits: {fit.kv_tokens or 0:,} KV tokens, one request up to "
            f"{fit.max_context or 0:,} tokens ({result.chosen_reason})",
        )
    # Group the profiles by reason so "no GPU" is said once, not five times.
    by_reason: dict[str, list[str]] = {}
    for f in result.profiles:
        by_reason.setdefault("; ".join(f.reasons), []).append(f.name)
    why = " | ".join(
        f"{', '.join(names)}: {reason}" for reason, names in by_reason.items() if reason
    )
    status = FAIL if settings.engine.request_gpu else WARN
    return Check("profile", status, f"{result.chosen_reason}: {why}", "step-station plan")


def _cached_bytes(hf_root: Path, repo_id: str) -> int:
    """Bytes of this repo already in the Hugging Face cache (resumed downloads count)."""
    blobs = hf_root / "hub" / f"models--{repo_id.replace('/', '--')}" / "blobs"
    total = 0
    if blobs.is_dir():
        for entry in os.scandir(blobs):
            try:
                total += entry.stat().st_size
            except OSError:
                continue
    return total


def _device(path: Path) -> int | None:
    probe = path.expanduser().absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        return probe.stat().st_dev
    except OSError:
        return None


def check_disk(
    settings: Settings,
    result: planner.Plan,
    facts: DockerFacts,
    disk_free: Callable[[Path], int] = hardware.disk_free,
) -> Check:
    engine = settings.engine
    fit = result.chosen_fit
    if fit is not None:
        profile = profiles.get_profile(fit.name)
    elif engine.profile in profiles.PROFILES:
        profile = profiles.get_profile(engine.profile)
    else:
        profile = profiles.get_profile("fp8-tp1")  # the DGX Station default
    hf_root = profiles.hf_cache_path(engine)
    model = engine.model_override or profile.checkpoint
    local_model = model.startswith(("/", "./", "~"))
    weights = 0 if local_model else int(profile.weights_gb * GB)
    have = 0 if local_model else _cached_bytes(hf_root, model)
    need_weights = max(0, weights - have)
    need_image = IMAGE_BYTES if engine.runtime == "docker" else 0
    image_root = Path(facts.root_dir) if facts.root_dir else None
    same_disk = image_root is None or _device(image_root) == _device(hf_root)
    free = disk_free(hf_root)
    need_here = need_weights + (need_image if same_disk else 0)
    image = fmt_bytes(IMAGE_BYTES, digits=0)
    what = f"{profile.name} needs {fmt_bytes(need_weights)} more of weights" + (
        f" ({fmt_bytes(have)} already cached)" if have else ""
    )
    if need_image and same_disk:
        what += f" + ~{image} for the image unless it is already pulled"
    detail = f"{fmt_bytes(free)} free at {hf_root}; {what}"
    room = fmt_bytes(need_here, digits=0).replace(" ", "")
    fix = f"step-station config set engine.hf_cache_dir /path/with/{room}/free"
    if free < need_here:
        return Check("disk", FAIL, detail, fix)
    if image_root is not None and not same_disk and need_image:
        image_free = disk_free(image_root)
        detail += f"; {fmt_bytes(image_free)} free at {image_root} for the ~{image} image"
        if image_free < need_image:
            return Check("disk", FAIL, detail, "docker system prune")
    if free - need_here < DISK_MARGIN_BYTES:
        margin = fmt_bytes(DISK_MARGIN_BYTES, digits=0)
        return Check("disk", WARN, detail + f" (less than {margin} to spare)", fix)
    return Check("disk", PASS, detail)


def port_in_use(host: str, port: int) -> str | None:
    """Why `host:port` cannot be bound now, or None when it is free."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        # Servers set SO_REUSEADDR too: a port in TIME_WAIT is not "in use" for them.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as err:
            if err.errno == errno.EADDRINUSE:
                return "in use"
            return err.strerror or str(err)
    return None


def check_engine_socket(settings: Settings) -> Check:
    """Where the engine will listen when it is on its private socket (endpoint.py)."""
    path = endpoint.socket_path(settings.engine.container_name)
    if endpoint.socket_answers(path):
        return Check(
            "engine-socket",
            PASS,
            f"an engine answers on its private socket {path} (Step Station's, if it is running)",
        )
    return Check(
        "engine-socket",
        PASS,
        f"the engine will listen on the private socket {path}, not on a TCP port",
    )


def check_ports(settings: Settings) -> list[Check]:
    gateway_host = "0.0.0.0" if settings.gateway.share_lan else "127.0.0.1"
    wanted = [
        ("ui", "ui.port", settings.ui.host, settings.ui.port),
        ("gateway", "gateway.port", gateway_host, settings.gateway.port),
    ]
    checks: list[Check] = []
    if endpoint.uses_socket(settings.engine):
        checks.append(check_engine_socket(settings))
    else:
        wanted.insert(0, ("engine", "engine.port", settings.engine.host, settings.engine.port))
    seen: dict[int, str] = {}
    for label, key, host, port in wanted:
        name = f"port-{label}"
        fix = f"step-station config set {key} {port + 10}"
        if port in seen:
            checks.append(
                Check(name, FAIL, f"{key} = {port} is also {seen[port]}; each needs its own", fix)
            )
            continue
        seen[port] = key
        problem = port_in_use(host, port)
        if problem is None:
            checks.append(Check(name, PASS, f"{host}:{port} is free"))
        else:
            checks.append(
                Check(
                    name,
                    FAIL,
                    f"{host}:{port} ({key}) is {problem}; `ss -ltnp 'sport = :{port}'` shows who "
                    "holds it (if Step Station is already running, that is expected)",
                    fix,
                )
            )
    return checks


def check_hf_token(settings: Settings, token: str, result: planner.Plan) -> Check:
    if token:
        return Check("hf-token", PASS, "Hugging Face token is set (not shown)")
    fit = result.chosen_fit
    repo = settings.engine.model_override or (
        profiles.get_profile(fit.name).checkpoint if fit else "stepfun-ai/Step-3.7-Flash-FP8"
    )
    return Check(
        "hf-token",
        PASS,
        f"no Hugging Face token; not needed for the public {repo} checkpoint (a token avoids "
        "Hub rate limits)",
        "step-station config set-secret hf_token",
    )


def check_settings(warnings: list[str]) -> Check:
    if warnings:
        return Check("settings", WARN, " ".join(warnings), "step-station config show")
    return Check("settings", PASS, "settings file is valid")


# ------------------------------------------------------------------------------------ runner


def run_doctor(
    settings: Settings,
    *,
    hf_token: str = "",
    settings_warnings: list[str] | None = None,
    hw: Hardware | None = None,
    docker: Callable[[], DockerFacts] = probe_docker,
    cdi_dirs: Iterable[str] = CDI_DIRS,
    disk_free: Callable[[Path], int] = hardware.disk_free,
) -> Report:
    """Every check, in the order a start needs them."""
    facts = docker() if settings.engine.runtime == "docker" else DockerFacts()
    hw = hw if hw is not None else hardware.detect()
    result = planner.plan(hw, profiles.PROFILES, settings.engine)
    checks = [
        check_settings(settings_warnings or []),
        check_docker(settings, facts),
        check_docker_version(settings, facts),
        check_nvidia_runtime(settings, facts, cdi_dirs),
        check_gpu(settings, hw),
        check_profile(settings, result),
        check_disk(settings, result, facts, disk_free),
        *check_ports(settings),
        check_hf_token(settings, hf_token, result),
    ]
    return Report(checks)
