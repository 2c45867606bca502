"""One MoE kernel tuning run: stop the engine, run vLLM's tuner on its GPU, check, install.

The tuner is vLLM's repository script `benchmarks/kernels/benchmark_moe.py`, run in a sibling
container of the engine's own image (the image's Triton and vLLM are the ones that will read the
result: `merge_configs` refuses parts from two Triton versions). What shapes this module
(docs/moe-tuning.md has the sources):

- the tuner writes its file only at its very end, so a killed run leaves nothing: the batch sizes
  are tuned in chunks, one tuner run each, and the chunks' files merged (`tune.merge_configs`);
- it names its file with vLLM's own `get_config_file_name`, in the image that will read it, so
  the installed file keeps the tuner's name (checked against the expected shape);
- it prints `Start tuning over N configurations...` and `Completed tuning for batch_size=M` per
  batch size (upstream `benchmark_moe.py`, `tune()`), which is the progress shown; its per-config
  bar is Ray's `tqdm_ray`, not read here;
- it needs the whole GPU, so the engine is stopped first, and a benchmark in progress refuses it.

The GPU is needed only by the tuner process itself: `TunerLauncher` is that seam. The container
launcher is the real one; tests hand in a launcher whose process writes a config in vLLM's format.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from appliance.bench import tune
from appliance.bench.errors import BenchError, TunedConfigError
from appliance.settings import data_dir

log = logging.getLogger(__name__)

# The label a tuner container carries (its value: the run's stamp); leftovers are found by it.
LABEL_TUNE = "io.step-station.tune"
# Inside a tuner container: the synthetic model config (read-only) and where the tuner saves.
CONTAINER_MODEL_DIR = "/run/step-station-tune/model"
CONTAINER_SAVE_DIR = "/run/step-station-tune/out"
TERMINATE_GRACE_S = 10.0
OUTPUT_TAIL_BYTES = 16 * 1024

# What the person picks, and the tuner's `--dtype` for it. NVFP4 is named so that it is refused
# with the reason: no NVFP4 MoE backend on Blackwell reads these Triton configs (vLLM 0.32
# `fused_moe/oracle/nvfp4.py:43`; only EMULATION does, and `nvfp4_emulation_moe.py` says the
# tuner does not support it).
DTYPES = {"fp8": "fp8_w8a8", "nvfp4": None}

# The search space per batch size with block FP8 [128,128] (upstream `get_configs_compute_bound`
# less the configs whose BLOCK_SIZE_N/K are not multiples of 128): 5*2*2*4*2*4.
CONFIGS_PER_BATCH_SIZE = 640
# docs/moe-tuning.md: one GB300, 640 configs x 18 batch sizes, "on the order of 1-3 hours". An
# estimate from other tuners' reports, not a measurement: said as such, and replaced by the
# run's own rate once a batch size is done.
ESTIMATE_HOURS_FOR_18 = (1.0, 3.0)

ENGINE_STAYS_STOPPED = "The engine stays stopped: `step-station start` starts it again."

_STARTED = re.compile(r"Start tuning over (\d+) configurations")
_COMPLETED = re.compile(r"Completed tuning for batch_size=(\d+)")


# ------------------------------------------------------------------------------------ data


@dataclass(frozen=True)
class TuneTarget:
    """The engine as the tuner needs it (built by the assembly from settings and the runtime)."""

    image: str
    gpu_uuid: str  # "" : the only GPU
    gpu_name: str  # as NVML reports it ("NVIDIA GB300")
    text_config: dict[str, Any]  # the checkpoint's text_config
    block_shape: tuple[int, int] | None = (128, 128)  # quantization_config.weight_block_size
    image_digest: str = ""
    # As the engine's `engine.request_gpu`: off only where Docker has no NVIDIA runtime (tests
    # of the orchestration against the CPU test image, with a stand-in tuner).
    request_gpu: bool = True


@dataclass(frozen=True)
class TuneRequest:
    dtype: str = "fp8"
    batch_sizes: tuple[int, ...] = tune.DEFAULT_BATCH_SIZES
    chunk_size: int = 3  # batch sizes per tuner run: a killed run loses one chunk at most

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TuneRequest:
        sizes = data.get("batch_sizes") or tune.DEFAULT_BATCH_SIZES
        return cls(
            dtype=str(data.get("dtype") or "fp8"),
            batch_sizes=tuple(int(b) for b in sizes),
            chunk_size=int(data.get("chunk_size") or 3),
        )

    def chunks(self) -> list[tuple[int, ...]]:
        sizes = sorted(set(self.batch_sizes))
        step = max(1, self.chunk_size)
        return [tuple(sizes[i : i + step]) for i in range(0, len(sizes), step)]


@dataclass(frozen=True)
class TuneState:
    """The run in progress, for the status payload and the progress lines."""

    dtype: str
    started_at: float  # wall clock
    total: int  # batch sizes to tune
    done: int = 0
    chunk: int = 0  # 1-based, 0 before the first tuner starts
    chunks: int = 0
    elapsed_s: float = 0.0
    message: str = ""
    remaining_s: float | None = None  # from this run's own rate, once a batch size is done
    cancelling: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class TuneOutcome:
    """`completed` (the file installed) or `cancelled` (nothing installed)."""

    state: str
    file_name: str = ""
    path: str = ""
    batch_sizes: tuple[int, ...] = ()
    elapsed_s: float = 0.0
    note: str = ""

    @property
    def completed(self) -> bool:
        return self.state == "completed"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def estimate_text(batch_sizes: int, gpu_name: str) -> str:
    """How long tuning takes, said honestly: scaled from docs/moe-tuning.md's estimate."""
    low, high = (h * batch_sizes / 18 for h in ESTIMATE_HOURS_FOR_18)
    gpu = gpu_name or "this GPU"
    return (
        f"about {_hours(low)}-{_hours(high)} on one {gpu} for {batch_sizes} batch sizes "
        f"({CONFIGS_PER_BATCH_SIZE} kernel configs each); an estimate from other tuners' "
        "reports, not a measurement: the run's own rate replaces it after the first batch size"
    )


def stop_message(batch_sizes: int, gpu_name: str) -> str:
    return (
        f"The engine is stopped while tuning; it takes {estimate_text(batch_sizes, gpu_name)}. "
        "Chat and the API are unavailable until it is started again."
    )


def _hours(h: float) -> str:
    return f"{h:.1f} h" if h >= 1 else f"{max(1, round(h * 60))} min"


# ------------------------------------------------------------------------------ the seam


@dataclass(frozen=True)
class TunerJob:
    """One tuner run: its argv (run from `tune.TUNER_WORKDIR`) and its host folders."""

    argv: tuple[str, ...]
    model_dir: Path  # holds the synthetic config.json (mounted read-only)
    save_dir: Path  # the tuner writes its file here
    stamp: str
    batch_sizes: tuple[int, ...]


class TunerProcess(Protocol):
    """A started tuner: its output, its end, and a way to stop it."""

    def read_output(self) -> bytes:
        """The next chunk of its output (stdout and stderr); b"" once it has ended."""
        ...

    def wait(self, timeout_s: float) -> int | None:
        """The exit code, or None if it is still running after `timeout_s`."""
        ...

    def terminate(self) -> None: ...

    def cleanup(self) -> None: ...

    def output_tail(self) -> str: ...


class TunerLauncher(Protocol):
    """The one part that needs the GPU: starts vLLM's tuner for a job."""

    def launch(self, job: TunerJob) -> TunerProcess: ...


def container_request(target: TuneTarget, job: TunerJob) -> dict[str, Any]:
    """docker-py `containers.run()` arguments for a tuner container (pure; tested as data).

    The engine's image (by digest when known), `python3` as the program from /vllm-workspace
    (the image's entrypoint is `vllm serve`), the engine's GPU by UUID, the host's IPC (PyTorch's
    shared memory, as the engine), no network (the tuner reads only the mounted config, and the
    local Ray it starts then listens on nothing beyond the container's loopback), the model
    config read-only and the save folder read-write."""
    image = target.image_digest if target.image_digest.startswith("sha256:") else target.image
    gpu: dict[str, Any] = {"capabilities": [["gpu"]]}
    gpu |= {"device_ids": [target.gpu_uuid]} if target.gpu_uuid else {"count": -1}
    gpus = {"device_requests": [gpu]} if target.request_gpu else {}
    return {
        "image": image,
        "entrypoint": [job.argv[0]],
        "command": list(job.argv[1:]),
        "working_dir": tune.TUNER_WORKDIR,
        "name": f"step-station-tune-{job.stamp}",
        "labels": {LABEL_TUNE: job.stamp},
        # The tuner's progress lines are plain print()s: without this, Python block-buffers
        # them into the log pipe and they would arrive in lumps, or only at its end.
        "environment": {
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "PYTHONUNBUFFERED": "1",
        },
        "network_mode": "none",
        "ipc_mode": "host",
        "volumes": {
            str(job.model_dir): {"bind": CONTAINER_MODEL_DIR, "mode": "ro"},
            str(job.save_dir): {"bind": CONTAINER_SAVE_DIR, "mode": "rw"},
        },
        **gpus,
        "detach": True,
    }


class _Container:
    """A running tuner container through docker-py's object (duck-typed: only
    appliance/engine/docker_runtime.py imports docker; the assembly hands its client in)."""

    def __init__(self, container: Any) -> None:
        self.container = container
        self._stream: Iterator[bytes] = iter(
            container.logs(stream=True, follow=True, stdout=True, stderr=True)
        )
        self._code: int | None = None

    def read_output(self) -> bytes:
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
            data = self.container.logs(stdout=True, stderr=True, tail=60)
        except Exception:  # noqa: BLE001 - a container already gone leaves nothing to show
            return ""
        return bytes(data).decode(errors="replace")


class ContainerTunerLauncher:
    """The real seam: the tuner in a sibling container of the engine's image."""

    def __init__(self, target: TuneTarget, client: Any) -> None:
        self.target = target
        self.client = client

    def request(self, job: TunerJob) -> dict[str, Any]:
        """The container's arguments (an integration test adds a stand-in tuner's mount)."""
        return container_request(self.target, job)

    def launch(self, job: TunerJob) -> TunerProcess:
        for old in self.client.containers.list(all=True, filters={"label": LABEL_TUNE}):
            with contextlib.suppress(Exception):
                old.remove(force=True)  # one tuning at a time: any other is a leftover
        try:
            container = self.client.containers.run(**self.request(job))
        except Exception as err:  # noqa: BLE001 - docker-py's errors, translated here
            raise BenchError(
                f"Docker could not start the tuner container ({err}).",
                hint="`step-station doctor` checks Docker; the engine's image must be present.",
            ) from err
        return _Container(container)


# ---------------------------------------------------------------------------- the runner

ProgressCallback = Callable[[TuneState], None]


class TuneRunner:
    """One tuning at a time; the service owns one, the CLI without a service another.

    `run()` blocks until the run ends; `cancel()` from another thread stops it (nothing is
    installed); `current()` is the run in progress."""

    def __init__(
        self,
        *,
        launcher_for: Callable[[TuneTarget], TunerLauncher],
        ensure_bench_idle: Callable[[], None] = lambda: None,
        folder: Path | None = None,
        work_root: Path | None = None,
        wall: Callable[[], float] = time.time,
        clock: Callable[[], float] = time.monotonic,
        chunk_timeout_s: float = 12 * 3600.0,
    ) -> None:
        self._launcher_for = launcher_for
        self._ensure_bench_idle = ensure_bench_idle
        self.folder = folder or tune.default_folder()
        self._work_root = work_root
        self._wall = wall
        self._clock = clock
        self.chunk_timeout_s = chunk_timeout_s
        self._lock = threading.Lock()
        self._state: TuneState | None = None
        self._process: TunerProcess | None = None
        self._cancel = threading.Event()

    def current(self) -> TuneState | None:
        with self._lock:
            return self._state

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

    def start_refusal(self) -> TunedConfigError | None:
        """The supervisor's start guard (Supervisor.add_start_guard): while a run holds the GPU,
        every start, from the control socket, the Model tab or a LAN request, is refused with
        this. The run's state is claimed before the engine is stopped, so no start slips in
        between."""
        with self._lock:
            if self._state is None:
                return None
        return TunedConfigError(
            "MoE tuning is running on the engine's GPU; the engine starts after it.",
            hint="Wait for `step-station tune-moe` to finish, or cancel it.",
        )

    def ensure_idle(self) -> None:
        with self._lock:
            if self._state is not None:
                raise BenchError(
                    "MoE tuning is already running.",
                    hint="Wait for it, or cancel it (`step-station tune-moe` Ctrl-C).",
                )

    def run(
        self,
        request: TuneRequest,
        target: TuneTarget,
        stop_engine: Callable[[str], object],
        on_progress: ProgressCallback | None = None,
    ) -> TuneOutcome:
        """Tune, check and install; `stop_engine(message)` is called first with the sentence
        that tells the person why and for how long."""
        dtype = _tuner_dtype(request.dtype)
        shape = tune.moe_shape(target.text_config, dtype=dtype, block_shape=target.block_shape)
        model_config = tune.tuner_model_config(target.text_config, block_shape=target.block_shape)
        chunks = request.chunks()
        if not chunks or any(b < 1 for b in request.batch_sizes):
            raise TunedConfigError(f"Batch sizes must be positive (got {request.batch_sizes}).")
        total = sum(len(c) for c in chunks)
        message = stop_message(total, target.gpu_name)
        self._ensure_bench_idle()  # before claiming: a benchmark's numbers would be wrong
        self._claim(TuneState(request.dtype, self._wall(), total, chunks=len(chunks)))
        try:
            self._note(on_progress, message=message)
            stop_engine(message)
            try:
                with self._work_dir() as work:
                    (work / "model").mkdir()
                    (work / "model" / "config.json").write_text(json.dumps(model_config, indent=2))
                    return self._tune(request, target, shape, chunks, work, on_progress)
            except BenchError as err:
                # the engine was stopped for this run; whoever reads the error must know
                err.hint = f"{err.hint} {ENGINE_STAYS_STOPPED}".strip()
                raise
        finally:
            with self._lock:
                self._state = None
                self._process = None

    # ------------------------------------------------------------------------------ inside

    def _claim(self, state: TuneState) -> None:
        with self._lock:
            if self._state is not None:
                raise BenchError("MoE tuning is already running.")
            self._cancel.clear()
            self._state = state

    @contextlib.contextmanager
    def _work_dir(self) -> Iterator[Path]:
        # Under the data folder, not /tmp: a container mounts it, and in the compose setup only
        # the data folder is the host's at the same path.
        root = self._work_root or data_dir() / "tune-runs"
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="tune-", dir=root) as tmp:
            yield Path(tmp)

    def _tune(
        self,
        request: TuneRequest,
        target: TuneTarget,
        shape: tune.MoeShape,
        chunks: list[tuple[int, ...]],
        work: Path,
        on_progress: ProgressCallback | None,
    ) -> TuneOutcome:
        started = self._clock()
        parts: list[tuple[str, dict[str, Any]]] = []
        launcher = self._launcher_for(target)
        for index, sizes in enumerate(chunks, 1):
            if self._cancel.is_set():
                return TuneOutcome("cancelled", elapsed_s=self._clock() - started)
            save = work / f"out-{index}"
            save.mkdir()
            # the container's tuner runs as root; a rootless Docker maps it to another user,
            # who must still write here (the 0700 work root keeps other accounts out)
            os.chmod(save, 0o777)  # noqa: S103
            job = TunerJob(
                argv=tuple(
                    tune.tuner_argv(
                        model_dir=CONTAINER_MODEL_DIR,
                        save_dir=CONTAINER_SAVE_DIR,
                        dtype=shape.dtype,
                        batch_sizes=sizes,
                    )
                ),
                model_dir=work / "model",
                save_dir=save,
                stamp=time.strftime("%Y%m%d-%H%M%S", time.gmtime(self._wall())) + f"-{index}",
                batch_sizes=sizes,
            )
            self._note(on_progress, chunk=index, message=f"Tuning batch sizes {_sizes(sizes)}")
            self._follow(launcher.launch(job), started, on_progress)
            if self._cancel.is_set():
                return TuneOutcome("cancelled", elapsed_s=self._clock() - started)
            parts.append(self._read_part(save, shape, sizes))
        return self._install(parts, shape, target, self._clock() - started)

    def _follow(
        self, process: TunerProcess, started: float, on_progress: ProgressCallback | None
    ) -> None:
        with self._lock:
            self._process = process
        if self._cancel.is_set():  # cancelled while it was launching
            process.terminate()
        pump = threading.Thread(
            target=self._pump, args=(process, started, on_progress), daemon=True
        )
        pump.start()
        try:
            code = process.wait(self.chunk_timeout_s)
            if code is None:
                process.terminate()
                raise BenchError(
                    f"A tuner run took longer than {self.chunk_timeout_s / 3600:.0f} hours and "
                    "was stopped; nothing from it was kept.",
                    hint="Tune fewer batch sizes at a time (--batch-sizes).",
                )
            pump.join(10)
            if code != 0 and not self._cancel.is_set():
                raise BenchError(
                    f"vLLM's MoE tuner exited with code {code}: "
                    f"{_last_lines(process.output_tail())}",
                    hint="The lines above are the tuner's own; docs/moe-tuning.md lists what it "
                    "needs in the engine image (Ray, benchmarks/kernels/benchmark_moe.py).",
                )
        finally:
            with self._lock:
                self._process = None
            process.cleanup()

    def _pump(
        self, process: TunerProcess, started: float, on_progress: ProgressCallback | None
    ) -> None:
        pending = ""
        while chunk := process.read_output():
            pending += chunk.decode(errors="replace")
            *lines, pending = re.split(r"[\r\n]", pending)
            for line in lines:
                if _COMPLETED.search(line):
                    done = (self.current() or TuneState("", 0, 0)).done + 1
                    self._note(on_progress, done=done, started=started)
                elif match := _STARTED.search(line):
                    self._note(
                        on_progress, started=started, message=f"{match[1]} kernel configs each"
                    )

    def _note(
        self,
        on_progress: ProgressCallback | None,
        *,
        started: float | None = None,
        **changes: Any,
    ) -> None:
        with self._lock:
            if self._state is None:
                return
            state = dataclasses.replace(self._state, **changes)
            if started is not None:
                elapsed = self._clock() - started
                remaining = None
                if state.done:
                    remaining = elapsed / state.done * (state.total - state.done)
                state = dataclasses.replace(
                    state, elapsed_s=round(elapsed, 1), remaining_s=remaining
                )
            self._state = state
        if on_progress is not None:
            try:
                on_progress(state)
            except (OSError, ValueError) as err:  # the watcher went away; the run goes on
                log.info("tune: progress not delivered: %s", err)

    def _read_part(
        self, save: Path, shape: tune.MoeShape, sizes: tuple[int, ...]
    ) -> tuple[str, dict[str, Any]]:
        """The one file a tuner run wrote, checked: vLLM's name for our shape, vLLM's format,
        every batch size asked for."""
        files = [p for p in save.iterdir() if p.suffix == ".json"]
        if len(files) != 1:
            raise TunedConfigError(
                f"vLLM's tuner wrote {len(files)} config files for batch sizes {_sizes(sizes)} "
                f"(expected one): {', '.join(sorted(p.name for p in files)) or 'none'}.",
                hint="Its output above says why; nothing was installed.",
            )
        path = files[0]
        parsed = tune.parse_config_file_name(path.name)
        if parsed is None or parsed[0] != shape:
            raise TunedConfigError(
                f"vLLM's tuner wrote {path.name}, which is not the file vLLM loads for "
                f"E={shape.E}, N={shape.N}, dtype={shape.dtype}, block {shape.block_shape}.",
                hint="The synthetic model config did not carry Step-3.7's expert shape; "
                "nothing was installed.",
            )
        data = json.loads(path.read_text(encoding="utf-8"))
        problems = tune.check_config(data)
        if problems:
            raise TunedConfigError(
                f"vLLM's tuner wrote {path.name} in a format vLLM would not load: {problems[0]}."
            )
        missing = sorted(set(sizes) - {int(k) for k in data if k != "triton_version"})
        if missing:
            raise TunedConfigError(
                f"vLLM's tuner left out batch sizes {_sizes(missing)} from {path.name}."
            )
        return path.name, data

    def _install(
        self,
        parts: list[tuple[str, dict[str, Any]]],
        shape: tune.MoeShape,
        target: TuneTarget,
        elapsed: float,
    ) -> TuneOutcome:
        names = {name for name, _ in parts}
        if len(names) != 1:
            raise TunedConfigError(
                f"vLLM's tuner named its chunks differently ({', '.join(sorted(names))}).",
                hint="The GPU seen by the tuner changed between chunks; nothing was installed.",
            )
        name = names.pop()
        merged_parts = [data for _, data in parts]
        existing = self.folder / name
        kept_old = False
        if existing.is_file():
            # A file tuned earlier for other batch sizes under the same Triton keeps them.
            with contextlib.suppress(TunedConfigError, OSError, ValueError):
                old = json.loads(existing.read_text(encoding="utf-8"))
                tune.merge_configs([old, *merged_parts])
                merged_parts.insert(0, old)
                kept_old = True
        merged = tune.merge_configs(merged_parts)
        path = install_atomically(self.folder, name, merged)
        sizes = tuple(int(k) for k in merged if k != "triton_version")
        record_install(
            self.folder,
            InstallRecord(
                file_name=name,
                installed_at=self._wall(),
                image=target.image,
                image_digest=target.image_digest,
                gpu_name=target.gpu_name,
                triton_version=str(merged.get("triton_version", "")),
                batch_sizes=sizes,
            ),
        )
        notes = []
        expected = tune.config_file_name(shape, target.gpu_name) if target.gpu_name else name
        if expected != name:
            notes.append(
                f"vLLM in the image names this GPU differently from NVML ({name} vs {expected}); "
                "the tuner's name is the one the engine looks for."
            )
        if kept_old:
            notes.append("Batch sizes tuned earlier with the same Triton were kept.")
        notes.append("Start the engine to use it (every start mounts the folder).")
        return TuneOutcome(
            "completed",
            file_name=name,
            path=str(path),
            batch_sizes=sizes,
            elapsed_s=round(elapsed, 1),
            note=" ".join(notes),
        )


# Beside the configs, one JSON object a line per install. Not `*.json`: vLLM looks for its one
# file by name and `read_folder` lists `*.json`, so neither ever mistakes it for a config.
INSTALLS_FILE = "installs.jsonl"


@dataclass(frozen=True)
class InstallRecord:
    """When and from which image a config was installed: the Model tab says whether the file
    was tuned with the engine's current image (its Triton), and the before/after pairing of
    benchmark runs splits at `installed_at`."""

    file_name: str
    installed_at: float
    image: str = ""
    image_digest: str = ""
    gpu_name: str = ""
    triton_version: str = ""
    batch_sizes: tuple[int, ...] = ()


def record_install(folder: Path, record: InstallRecord) -> None:
    line = json.dumps(dataclasses.asdict(record), sort_keys=True)
    with (folder / INSTALLS_FILE).open("a", encoding="utf-8") as out:
        out.write(line + "\n")


def last_install(folder: Path, file_name: str) -> InstallRecord | None:
    """The latest install of `file_name` the appliance recorded (None for a file copied in by
    hand, or an unreadable record: the file's own date stands in then)."""
    try:
        lines = (folder / INSTALLS_FILE).read_text(encoding="utf-8").splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        try:
            data = json.loads(line)
            if data.get("file_name") == file_name:
                data["batch_sizes"] = tuple(data.get("batch_sizes") or ())
                return InstallRecord(**data)
        except (ValueError, TypeError, AttributeError):
            continue
    return None


def install_atomically(folder: Path, name: str, data: dict[str, Any]) -> Path:
    """Write `data` as `folder/name` so that an engine start never sees half a file: a temporary
    file in the same folder (same file system), flushed to disk, then renamed over."""
    problems = tune.check_config(data)
    if problems:
        raise TunedConfigError(f"Refusing to install {name}: {problems[0]}.")
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".installing-", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            json.dump(data, out, indent=4)
            out.write("\n")
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, 0o644)  # the engine container reads it, perhaps as another user
        os.replace(tmp, folder / name)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return folder / name


def _tuner_dtype(dtype: str) -> str:
    if dtype not in DTYPES:
        raise TunedConfigError(f"Unknown dtype {dtype!r}: fp8 or nvfp4.")
    tuner = DTYPES[dtype]
    if tuner is None:
        raise TunedConfigError(
            "NVFP4 cannot be tuned: no NVFP4 MoE kernel on this GPU reads vLLM's tuned Triton "
            "configs, and vLLM's tuner has no NVFP4 mode.",
            hint="Tune with --dtype fp8 for the FP8 profile; the NVFP4 profile runs "
            "FlashInfer/CUTLASS kernels with their own autotuning.",
        )
    return tuner


def _sizes(sizes: Sequence[int]) -> str:
    return ", ".join(str(s) for s in sizes)


def _last_lines(text: str, n: int = 8) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return " | ".join(lines[-n:]) or "(no output)"


__all__ = [
    "ContainerTunerLauncher",
    "InstallRecord",
    "TuneOutcome",
    "TuneRequest",
    "TuneRunner",
    "TuneState",
    "TuneTarget",
    "TunerJob",
    "TunerLauncher",
    "TunerProcess",
    "container_request",
    "estimate_text",
    "install_atomically",
    "last_install",
    "record_install",
    "stop_message",
]
