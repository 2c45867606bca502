"""The only module that imports docker (docker-py).

Started by the doctor (issue 2) with a read-only probe of the Docker engine; the engine
runtime (`DockerRuntime`) belongs here too. Keep additions additive.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import docker
import docker.errors
import requests.exceptions

from appliance.errors import DockerUnavailableError


@dataclass(frozen=True)
class DockerProbe:
    """What the doctor needs to know about the local Docker engine."""

    version: str  # engine version, e.g. "20.10.24"
    api_version: str
    runtimes: list[str] = field(default_factory=list)  # e.g. ["io.containerd.runc.v2", "nvidia"]
    default_runtime: str = ""
    cdi_spec_dirs: list[str] = field(default_factory=list)  # where the daemon looks for CDI specs


def docker_probe(timeout: float = 3.0) -> DockerProbe:
    """Version and runtimes of the Docker engine at DOCKER_HOST (or the default socket).

    Raises DockerUnavailableError, saying what to do, when the engine cannot be reached.
    """
    try:
        client = docker.from_env(timeout=int(max(1, timeout)))
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
    )


def docker_version(timeout: float = 3.0) -> str:
    """The Docker engine's version string; DockerUnavailableError when unreachable."""
    return docker_probe(timeout).version
