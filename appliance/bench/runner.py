"""One `vllm bench serve` run against the running engine: launch, progress, cancel, keep.

The appliance runs vLLM's own benchmark, never one of its own, so the numbers are the ones the
model card and vLLM's users quote. Where it runs:

- the process runtime (the pip route): the `vllm` program beside the engine's own (`vllm bench
  serve` ships in the same wheel);
- the Docker runtime: a sibling container of the engine's own image (by digest when known), with
  `vllm` as its entrypoint (the image's is `vllm serve`), the host's network (to reach the bridge
  on loopback), the tokenizer's folder mounted read-only, and a label the appliance finds and
  removes it by.

How it reaches the engine: `vllm bench serve` speaks TCP only (vLLM 0.32
`vllm/benchmarks/serve.py` and `lib/endpoint_request_func.py` open every session with
`aiohttp.TCPConnector`), while the engine listens on a private Unix socket by default. So for the
run's length a `TcpBridge` on 127.0.0.1 (an ephemeral port) pipes bytes to that socket. With
`through_gateway` the run goes through the gateway (TCP) instead, with an API key made for the run
and revoked after it, to show what a LAN client sees.

What vLLM does that shapes this module (0.32, run here; docs in /work/helpers notes):
- progress is a tqdm bar on stderr, one step per finished request (`ProgressReader`);
- SIGTERM or SIGINT end it at once and write no result file: cancel means "no result";
- it exits 0 even when every request failed, so success is judged from the file's
  `completed` / `failed` (`BenchResult.require_success`);
- it loads the tokenizer on the client, even for random prompts.

This module knows nothing of the engine package: the assembly (control.py) describes the running
engine as a `BenchTarget`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from appliance.bench import presets
from appliance.bench.errors import BenchError, BenchFailedError
from appliance.bench.progress import Progress, ProgressReader
from appliance.bench.result import load_result
from appliance.bench.store import BenchStore, RunInfo
from appliance.errors import ApplianceError
from appliance.settings import data_dir

log = logging.getLogger(__name__)

# The label a bench container carries (its value: the run's stamp); `remove_leftovers` finds them.
LABEL_BENCH = "io.step-station.bench"
# Inside a bench container: where the result file is written, the tokenizer, the key file.
CONTAINER_RESULT_DIR = "/run/step-station-bench/result"
CONTAINER_KEY_DIR = "/run/step-station-bench/key"
CONTAINER_TOKENIZER = "/run/step-station-bench/tokenizer"
CONTAINER_HF_CACHE = "/root/.cache/huggingface"
RESULT_FILE = "result.json"
KEY_FILE = "key"
# The key reaches the container through a 0600 file, not its environment (`docker inspect` shows
# the environment to anyone on the Docker socket), read the way the engine's entrypoint reads its.
CONTAINER_ENTRYPOINT = (
    "/bin/sh",
    "-c",
    'if [ -r "$0/key" ]; then read -r OPENAI_API_KEY < "$0/key"; export OPENAI_API_KEY; fi; '
    'exec vllm "$@"',
    CONTAINER_KEY_DIR,
)
TERMINATE_GRACE_S = 5.0
STDERR_TAIL_BYTES = 16 * 1024


# ------------------------------------------------------------------------------------ data


@dataclass(frozen=True)
class BenchTarget:
    """The running engine as the bench needs it (built by the assembly from the supervisor)."""

    engine_url: str  # the appliance's URL: `http+unix://...` (socket) or `http://127.0.0.1:N`
    api_key: str  # the engine's per-start key (vLLM wants it on /v1)
    served_model_name: str
    model: str  # the checkpoint: a Hub id or a local folder (vLLM's `--model`)
    context_len: int
    profile: str
    runtime: str  # "process" or "docker"
    program: str = ""  # process runtime: the `vllm` program beside the engine's
    image: str = ""  # docker: the engine's image reference
    image_digest: str = ""
    vllm_version: str = ""
    gpu_name: str = ""
    flags: Mapping[str, Any] = field(default_factory=dict)  # e.g. {"mtp": true}
    gateway_url: str = ""  # http://127.0.0.1:<gateway.port>
    hf_cache: str = ""  # the host's HF cache folder (holds hub/), for a Hub id's tokenizer
    # A local checkpoint's folder on the host. In a container the engine names its own mount
    # (`/models/<name>`), which a bench container must mount again from here.
    model_dir: str = ""

    @property
    def local_model(self) -> bool:
        return bool(self.model_dir) or self.model.startswith("/")


@dataclass(frozen=True)
class BenchRequest:
    """What the person asked for: a preset and optional overrides (the CLI's flags)."""

    preset: str = "seed"
    num_prompts: int | None = None
    random_input: int | None = None
    random_output: int | None = None
    max_concurrency: int | None = None
    through_gateway: bool = False

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BenchRequest:
        def opt(key: str) -> int | None:
            value = data.get(key)
            return None if value is None else int(value)

        return cls(
            preset=str(data.get("preset") or "seed"),
            num_prompts=opt("num_prompts"),
            random_input=opt("random_input"),
            random_output=opt("random_output"),
            max_concurrency=opt("max_concurrency"),
            through_gateway=bool(data.get("through_gateway")),
        )


@dataclass(frozen=True)
class BenchState:
    """The run in progress: small, for the status payload and the dashboard."""

    preset: str
    started_at: float  # wall clock
    done: int = 0
    total: int = 0
    elapsed_s: float = 0.0
    through_gateway: bool = False
    cancelling: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class BenchOutcome:
    """How a run ended: `completed` (stored, `id` set) or `cancelled` (nothing stored)."""

    state: str
    id: int | None = None
    profile: str = ""
    result: Mapping[str, Any] = field(default_factory=dict)  # vLLM's own result object

    @property
    def completed(self) -> bool:
        return self.state == "completed"

    def export(self) -> dict[str, Any]:
        """What `bench --json` prints: vLLM's keys plus `profile` and `id`."""
        return {**self.result, "profile": self.profile, "id": self.id}


# ------------------------------------------------------------------------------ the bridge


class TcpBridge:
    """A loopback TCP port that pipes every connection to the engine's Unix socket.

    Bound to 127.0.0.1 on an ephemeral port and open only while a run lasts. It passes bytes, not
    requests: the client still sends the engine's key. Threads, not asyncio: the runner is
    called from the control server's threads and the CLI alike, and a run holds at most
    `--max-concurrency` connections."""

    def __init__(self, socket_path: str, *, backlog: int = 64) -> None:
        self.socket_path = socket_path
        self._backlog = backlog
        self._listener: socket.socket | None = None
        self._closed = threading.Event()
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._thread: threading.Thread | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> str:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.bind(("127.0.0.1", 0))
        listener.listen(self._backlog)
        self._listener = listener
        self.port = listener.getsockname()[1]
        self._thread = threading.Thread(target=self._accept, name="bench-bridge", daemon=True)
        self._thread.start()
        return self.url

    def _accept(self) -> None:
        assert self._listener is not None
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            try:
                upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                upstream.connect(self.socket_path)
            except OSError as err:
                log.warning("bench bridge: cannot reach the engine's socket: %s", err)
                upstream.close()
                client.close()
                continue
            with self._lock:
                if self._closed.is_set():
                    client.close()
                    upstream.close()
                    return
                self._open |= {client, upstream}
            pair = _Pair(client, upstream, self._forget)
            pair.start()

    def _forget(self, *socks: socket.socket) -> None:
        with self._lock:
            self._open.difference_update(socks)

    def connections(self) -> int:
        with self._lock:
            return len(self._open) // 2

    def close(self) -> None:
        self._closed.set()
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)
            self._listener.close()
        with self._lock:
            held, self._open = set(self._open), set()
        for sock in held:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        if self._thread is not None:
            self._thread.join(5)

    def __enter__(self) -> TcpBridge:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Pair:
    """Two sockets piped both ways; each direction half-closes the other side at its end."""

    def __init__(
        self, a: socket.socket, b: socket.socket, done: Callable[..., None], chunk: int = 65536
    ) -> None:
        self.a, self.b, self._done, self._chunk = a, b, done, chunk
        self._left = 2
        self._lock = threading.Lock()

    def start(self) -> None:
        for src, dst in ((self.a, self.b), (self.b, self.a)):
            threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(self._chunk):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)
            with self._lock:
                self._left -= 1
                last = self._left == 0
            if last:
                self.a.close()
                self.b.close()
                self._done(self.a, self.b)


# ---------------------------------------------------------------------------- launchers


@dataclass(frozen=True)
class BenchJob:
    """One launch: the argv after `vllm bench serve`, its environment, its files."""

    args: tuple[str, ...]
    env: Mapping[str, str] = field(repr=False)
    work_dir: Path  # the run's private folder (result, log, key file)
    stamp: str  # names the run's container and files
    api_key: str = field(default="", repr=False)


class BenchProcess(Protocol):
    """A started bench: its stderr (tqdm), its end, and a way to stop it."""

    def read_stderr(self) -> bytes:
        """The next chunk of stderr; b"" once it has ended."""
        ...

    def wait(self, timeout_s: float) -> int | None:
        """The exit code, or None if it is still running after `timeout_s`."""
        ...

    def terminate(self) -> None: ...

    def cleanup(self) -> None: ...

    def output_tail(self) -> str:
        """The end of its stdout (vLLM's summary and errors), for a failure message."""
        ...


class Launcher(Protocol):
    def launch(self, job: BenchJob) -> BenchProcess: ...


def result_dir_for(work_dir: Path, runtime: str) -> str:
    """Where vLLM writes the result file, as the bench process sees the path."""
    return CONTAINER_RESULT_DIR if runtime == "docker" else str(work_dir / "result")


def tokenizer_for(target: BenchTarget) -> str:
    """What `--tokenizer` names, as the bench process sees it: the local checkpoint folder (in a
    container, where it is mounted), else the Hub id, read from the mounted/pointed HF cache."""
    if target.local_model and target.runtime == "docker":
        return CONTAINER_TOKENIZER
    return target.model


class _Popen:
    """`vllm bench serve` as a child process in a session of its own (stopped as a group)."""

    def __init__(self, argv: list[str], env: Mapping[str, str], work_dir: Path) -> None:
        self._out_path = work_dir / "bench.out"
        out = self._out_path.open("wb")
        try:
            self.proc = subprocess.Popen(  # noqa: S603 - argv built from presets.bench_args
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.PIPE,
                env=dict(env),
                cwd=work_dir,
                start_new_session=True,
            )
        except OSError as err:
            raise BenchError(
                f"Could not run {argv[0]!r} ({err.strerror}).",
                hint="The benchmark runs vLLM's own `vllm bench serve`: install vLLM beside the "
                "engine (`pip install 'step-station[native]'`).",
            ) from err
        finally:
            out.close()

    def read_stderr(self) -> bytes:
        assert self.proc.stderr is not None
        try:
            return os.read(self.proc.stderr.fileno(), 4096)
        except OSError:
            return b""

    def wait(self, timeout_s: float) -> int | None:
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            return None

    def terminate(self) -> None:
        # SIGTERM: vLLM's bench has no handler and dies at once (a SIGINT may be ignored when
        # a non-interactive shell started the parent in the background).
        for sig in (signal.SIGTERM, signal.SIGKILL):
            if self.proc.poll() is not None:
                return
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, sig)
            if self.wait(TERMINATE_GRACE_S) is not None:
                return

    def cleanup(self) -> None:
        self.terminate()
        if self.proc.stderr is not None:
            self.proc.stderr.close()

    def output_tail(self) -> str:
        try:
            data = self._out_path.read_bytes()[-STDERR_TAIL_BYTES:]
        except OSError:
            return ""
        return data.decode(errors="replace")


class ProcessLauncher:
    """The pip route: `<program> bench serve ...`, the program beside the engine's `vllm`."""

    def __init__(self, target: BenchTarget, base_env: Mapping[str, str] | None = None) -> None:
        self.target = target
        self.base_env = dict(os.environ if base_env is None else base_env)

    def argv(self, job: BenchJob) -> list[str]:
        return [self.target.program or "vllm", "bench", "serve", *job.args]

    def env(self, job: BenchJob) -> dict[str, str]:
        env = process_env(self.base_env, self.target)
        env.update(job.env)
        return env

    def launch(self, job: BenchJob) -> BenchProcess:
        return _Popen(self.argv(job), self.env(job), job.work_dir)


def process_env(base: Mapping[str, str], target: BenchTarget) -> dict[str, str]:
    """The bench child's environment: the caller's, without vLLM settings or a key of its own
    (`OPENAI_API_KEY` is the run's), offline, and pointed at the appliance's HF cache for a Hub
    id's tokenizer."""
    env = {k: v for k, v in base.items() if not k.startswith("VLLM_") and k != "OPENAI_API_KEY"}
    env["HF_HUB_OFFLINE"] = "1"  # the tokenizer is on this machine: never wait on the Hub
    env["TRANSFORMERS_OFFLINE"] = "1"
    if target.hf_cache and not target.local_model:
        env["HF_HOME"] = target.hf_cache
    return env


def container_request(target: BenchTarget, job: BenchJob) -> dict[str, Any]:
    """docker-py `containers.run()` arguments for a bench container (pure; tested as data).

    Same image as the engine (its digest when known, so a re-tagged image cannot slip in),
    `vllm` as the program, the host's network (the bridge or the gateway is on 127.0.0.1), the
    result folder read-write, the tokenizer (or the HF cache) and the key file read-only."""
    volumes: dict[str, dict[str, str]] = {
        str(job.work_dir / "result"): {"bind": CONTAINER_RESULT_DIR, "mode": "rw"},
        str(job.work_dir / "key"): {"bind": CONTAINER_KEY_DIR, "mode": "ro"},
    }
    if target.local_model:
        volumes[target.model_dir or target.model] = {"bind": CONTAINER_TOKENIZER, "mode": "ro"}
    elif target.hf_cache:
        volumes[target.hf_cache] = {"bind": CONTAINER_HF_CACHE, "mode": "ro"}
    image = target.image
    if target.image_digest.startswith("sha256:"):
        image = target.image_digest
    env = {k: v for k, v in job.env.items() if k != "OPENAI_API_KEY"}
    env |= {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return {
        "image": image,
        "entrypoint": list(CONTAINER_ENTRYPOINT),
        "command": ["bench", "serve", *job.args],
        "name": f"step-station-bench-{job.stamp}",
        "labels": {LABEL_BENCH: job.stamp},
        "environment": env,
        "network_mode": "host",
        "volumes": volumes,
        "detach": True,
        "stdout": True,
        "stderr": True,
    }


class _Container:
    """A running bench container, through docker-py's container object (duck-typed: only
    appliance/engine/docker_runtime.py imports docker; the assembly hands its client in)."""

    def __init__(self, container: Any) -> None:
        self.container = container
        self._stream: Iterator[bytes] = iter(
            container.logs(stream=True, follow=True, stdout=False, stderr=True)
        )
        self._code: int | None = None

    def read_stderr(self) -> bytes:
        try:
            return next(self._stream, b"")
        except Exception:  # noqa: BLE001 - docker-py raises its own errors on a gone container
            return b""

    def wait(self, timeout_s: float) -> int | None:
        if self._code is not None:
            return self._code
        try:
            outcome = self.container.wait(timeout=timeout_s)
        except Exception:  # noqa: BLE001 - requests' ReadTimeout, wrapped differently by versions
            return None
        self._code = int(outcome.get("StatusCode", 1))
        return self._code

    def terminate(self) -> None:
        with contextlib.suppress(Exception):
            self.container.stop(timeout=int(TERMINATE_GRACE_S))

    def cleanup(self) -> None:
        with contextlib.suppress(Exception):
            self.container.remove(force=True)

    def output_tail(self) -> str:
        try:
            data = self.container.logs(stdout=True, stderr=False, tail=60)
        except Exception:  # noqa: BLE001 - a container already gone leaves nothing to show
            return ""
        return bytes(data).decode(errors="replace")


class ContainerLauncher:
    """The Docker route: a sibling container of the engine's image (see `container_request`)."""

    def __init__(self, target: BenchTarget, client: Any) -> None:
        self.target = target
        self.client = client

    def launch(self, job: BenchJob) -> BenchProcess:
        (job.work_dir / "key").mkdir(mode=0o700, exist_ok=True)
        if job.api_key:
            key_file = job.work_dir / "key" / KEY_FILE
            fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as out:
                out.write(job.api_key + "\n")
        removed = remove_leftovers(self.client)  # one run at a time: any other is a leftover
        if removed:
            log.info("bench: removed %d benchmark container(s) left by an earlier run", removed)
        try:
            container = self.client.containers.run(**container_request(self.target, job))
        except Exception as err:  # noqa: BLE001 - docker-py's errors, translated here
            raise BenchError(
                f"Docker could not start the benchmark container ({err}).",
                hint="`step-station doctor` checks Docker; the engine's image must be present.",
            ) from err
        return _Container(container)


def remove_leftovers(client: Any) -> int:
    """Remove bench containers a crashed appliance left behind (found by their label)."""
    removed = 0
    for container in client.containers.list(all=True, filters={"label": LABEL_BENCH}):
        with contextlib.suppress(Exception):
            container.remove(force=True)
            removed += 1
    return removed


# ---------------------------------------------------------------------------- the runner


class KeyIssuer(Protocol):
    """What a run through the gateway needs of the key store (KeyStore, ServiceKeys)."""

    def create(self, name: str) -> Any: ...

    def revoke(self, name_or_id: str) -> Any: ...


ProgressCallback = Callable[[BenchState], None]


class BenchRunner:
    """Runs one benchmark at a time; the service owns one, the CLI without a service another.

    `run()` blocks until the run ends and returns its outcome; `cancel()` from another thread
    stops it (no result is kept); `current()` is the run in progress, for status and dashboard."""

    def __init__(
        self,
        store: BenchStore | None = None,
        *,
        launcher_for: Callable[[BenchTarget], Launcher] | None = None,
        keys: KeyIssuer | None = None,
        work_root: Path | None = None,
        wall: Callable[[], float] = time.time,
        clock: Callable[[], float] = time.monotonic,
        timeout_s: float = 6 * 3600.0,
    ) -> None:
        self.store = store or BenchStore()
        self._launcher_for = launcher_for or ProcessLauncher
        self.keys = keys
        self._work_root = work_root
        self._wall = wall
        self._clock = clock
        self.timeout_s = timeout_s
        self._lock = threading.Lock()
        self._state: BenchState | None = None
        self._process: BenchProcess | None = None
        self._cancel = threading.Event()

    # ----------------------------------------------------------------------------- reading

    def current(self) -> BenchState | None:
        with self._lock:
            return self._state

    def list_runs(self) -> list[Any]:
        return self.store.list_runs()

    # ------------------------------------------------------------------------------ control

    def cancel(self) -> bool:
        """Stop the run in progress; False when none runs."""
        with self._lock:
            if self._state is None:
                return False
            self._cancel.set()
            self._state = dataclasses.replace(self._state, cancelling=True)
            process = self._process
        if process is not None:
            process.terminate()
        return True

    def ensure_idle(self) -> None:
        """BenchError when a run is in progress (one run at a time: two would measure each
        other)."""
        with self._lock:
            self._refuse_if_busy()

    def _refuse_if_busy(self) -> None:
        if self._state is not None:
            raise BenchError(
                f"A benchmark ({self._state.preset}) is already running.",
                hint="Wait for it to finish, or cancel it (Ctrl-C in its terminal, or the "
                "Benchmark panel's Cancel).",
            )

    def _claim(self, request: BenchRequest) -> None:
        with self._lock:
            self._refuse_if_busy()
            self._cancel.clear()
            self._state = BenchState(
                preset=request.preset,
                started_at=self._wall(),
                through_gateway=request.through_gateway,
            )

    def _release(self) -> None:
        with self._lock:
            self._state = None
            self._process = None

    def run(
        self,
        request: BenchRequest,
        target: BenchTarget,
        on_progress: ProgressCallback | None = None,
    ) -> BenchOutcome:
        """Run the benchmark to its end; BenchError when it cannot run or its requests failed."""
        presets.get_preset(request.preset)  # a wrong name fails before anything starts
        self._claim(request)
        try:
            with self._work_dir(target.runtime) as work_dir:
                return self._run(request, target, work_dir, on_progress)
        finally:
            self._release()

    @contextlib.contextmanager
    def _work_dir(self, runtime: str) -> Iterator[Path]:
        # Under the data folder, not /tmp: a bench container mounts it, and in the compose setup
        # only the data folder is the host's at the same path (endpoint.SHARED_DATA_ENV).
        root = self._work_root or data_dir() / "bench-runs"
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="bench-", dir=root) as tmp:
            path = Path(tmp)
            os.chmod(path, 0o700)
            (path / "result").mkdir()
            if runtime == "docker":
                # the container's vLLM runs as root; a root-squashing or rootless Docker maps it
                # to another user, who must still write the result (the 0700 parent keeps
                # every other account out)
                os.chmod(path / "result", 0o777)  # noqa: S103
            yield path

    def _run(
        self,
        request: BenchRequest,
        target: BenchTarget,
        work_dir: Path,
        on_progress: ProgressCallback | None,
    ) -> BenchOutcome:
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(self._wall())) + f"-{os.getpid()}"
        with self._endpoint(request, target, stamp) as (base_url, api_key):
            job_args = presets.bench_args(
                request.preset,
                model=target.model,
                served_model_name=target.served_model_name,
                base_url=base_url,
                tokenizer=tokenizer_for(target),
                context_len=target.context_len,
                num_prompts=request.num_prompts,
                random_input=request.random_input,
                random_output=request.random_output,
                max_concurrency=request.max_concurrency,
                result_dir=result_dir_for(work_dir, target.runtime),
                result_filename=RESULT_FILE,
            )
            job = BenchJob(
                args=tuple(job_args),
                env=presets.bench_env(api_key),
                work_dir=work_dir,
                stamp=stamp,
                api_key=api_key,
            )
            code = self._launch_and_follow(job, target, on_progress)
        if self._cancel.is_set():
            return BenchOutcome(state="cancelled", profile=target.profile)
        return self._keep(request, target, job, code)

    @contextlib.contextmanager
    def _endpoint(
        self, request: BenchRequest, target: BenchTarget, stamp: str
    ) -> Iterator[tuple[str, str]]:
        """(base URL, key) for the run: the gateway with a key of the run's own, the engine
        on TCP, or a bridge to the engine's socket; everything made here goes with the run."""
        if request.through_gateway:
            if self.keys is None or not target.gateway_url:
                raise BenchError(
                    "Benchmarking through the gateway needs the running service.",
                    hint="Start it with `step-station up`, or run without --through-gateway.",
                )
            made = self.keys.create(f"bench-{stamp}")
            try:
                yield target.gateway_url, str(made.secret)
            finally:
                try:
                    self.keys.revoke(made.record.id)
                except ApplianceError as err:
                    log.warning("bench: could not revoke the run's key: %s", err)
            return
        socket_path = socket_path_of(target.engine_url)
        if socket_path is None:
            yield target.engine_url, target.api_key
            return
        with TcpBridge(socket_path) as bridge:
            yield bridge.url, target.api_key

    def _launch_and_follow(
        self, job: BenchJob, target: BenchTarget, on_progress: ProgressCallback | None
    ) -> int:
        launcher = self._launcher_for(target)
        process = launcher.launch(job)
        with self._lock:
            self._process = process
        if self._cancel.is_set():  # cancelled while it was launching
            process.terminate()
        started = self._clock()
        reader = ProgressReader()
        pump = threading.Thread(
            target=self._pump, args=(process, reader, started, on_progress), daemon=True
        )
        pump.start()
        try:
            code = process.wait(self.timeout_s)
            if code is None:
                process.terminate()
                raise BenchError(
                    f"The benchmark ran longer than {self.timeout_s / 3600:.1f} hours and was "
                    "stopped.",
                    hint="Run fewer prompts (--num-prompts).",
                )
            pump.join(10)
            if code != 0 and not self._cancel.is_set():
                raise BenchError(
                    f"`vllm bench serve` exited with code {code}: "
                    f"{_last_lines(process.output_tail())}",
                    hint="The lines above are vLLM's own; check the engine answers "
                    "(`step-station status`).",
                )
            return code
        finally:
            process.cleanup()

    def _pump(
        self,
        process: BenchProcess,
        reader: ProgressReader,
        started: float,
        on_progress: ProgressCallback | None,
    ) -> None:
        while chunk := process.read_stderr():
            progress = reader.feed(chunk)
            if progress is not None:
                self._note(progress, started, on_progress)

    def _note(
        self, progress: Progress, started: float, on_progress: ProgressCallback | None
    ) -> None:
        with self._lock:
            if self._state is None:
                return
            state = dataclasses.replace(
                self._state,
                done=progress.done,
                total=progress.total,
                elapsed_s=round(self._clock() - started, 1),
            )
            self._state = state
        if on_progress is not None:
            try:
                on_progress(state)
            except (OSError, ValueError) as err:  # the watcher went away; the run goes on
                log.info("bench: progress not delivered: %s", err)

    def _keep(
        self, request: BenchRequest, target: BenchTarget, job: BenchJob, code: int
    ) -> BenchOutcome:
        del code
        result = load_result(job.work_dir / "result" / RESULT_FILE)
        if not result.succeeded:
            raise BenchFailedError(
                f"The benchmark finished but {result.failed} of "
                f"{result.completed + result.failed} requests failed: "
                f"{_last_lines(_output_tail_file(job.work_dir))}",
                hint="vLLM names the reasons above; `step-station logs` shows the engine's side.",
            )
        flags = dict(target.flags) | {"through_gateway": request.through_gateway}
        info = RunInfo(
            profile=target.profile,
            preset=request.preset,
            args=_redacted(job.args),
            flags=flags,
            image_digest=target.image_digest,
            vllm_version=target.vllm_version,
            gpu_name=target.gpu_name,
        )
        run_id = self.store.add(info, result.raw)
        return BenchOutcome(
            state="completed", id=run_id, profile=target.profile, result=dict(result.raw)
        )


def socket_path_of(url: str) -> str | None:
    """The engine's socket path from the appliance's `http+unix://` URL (endpoint.split's rule:
    the path is the percent-encoded host), or None for a TCP URL."""
    from appliance import endpoint  # the one place that parses engine URLs

    path, _ = endpoint.split(url)
    return path


def _redacted(args: tuple[str, ...]) -> tuple[str, ...]:
    """The argv as stored: the run's temporary folders say nothing later; the loopback port of
    the bridge neither."""
    out = list(args)
    for flag, value in (("--result-dir", "<result dir>"), ("--base-url", "<engine>")):
        if flag in out:
            out[out.index(flag) + 1] = value
    return tuple(out)


def _output_tail_file(work_dir: Path) -> str:
    try:
        return (work_dir / "bench.out").read_bytes()[-STDERR_TAIL_BYTES:].decode(errors="replace")
    except OSError:
        return ""


def _last_lines(text: str, n: int = 8) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return " | ".join(lines[-n:]) or "(no output)"
