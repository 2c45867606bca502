"""The service's control channel: while `step-station up` runs, the CLI asks it, not the engine.

One supervisor owns the engine. Before this channel, `step-station start` in a terminal ran a
supervisor of its own beside the service's; the two agreed through a lock, labels and a re-check
every few seconds, so the terminal could say "ready" while the page still said "starting". Now the
service listens on a Unix socket private to its user and the engine verbs of the CLI (`start`,
`stop`, `restart`, `status`, `logs`) go there: the terminal, `/healthz` and every open page read the
same supervisor at the same moment. Without a running service the CLI runs a supervisor itself,
as before (Ollama's and LM Studio's CLIs talk to their running server the same way).

The socket: `<data>/control/service/control.sock` (or a private `/tmp/step-station-<uid>/`
folder when that path is too long for a socket address; see appliance/endpoint.py), folder 0700,
socket 0600: only the owner's account can connect, so no other local user drives the engine
through it.

The same goes for the commands that change what the service holds: `config set` goes to the
service's settings store (saved, and its supervisor and gateway take the new snapshot at once),
`keys create|revoke|list` to its key store (a revoked key is refused on the next request), and
`pull` to its supervisor's runtime.

The protocol is small HTTP/1.0 with JSON bodies, served by the stdlib on threads of its own (a
slow stop never blocks the UI's event loop):

    GET  /status                       {"status": EngineStatus.to_dict()}
    GET  /status?since=V&timeout=S     the same, once the version moved past V (long poll)
    GET  /status/full                  {"json": status --json's object, "lines": the text lines}
    POST /start   {"profile": P|null}  {"status": ...} (returns at once; poll /status)
    POST /stop                         {"status": ...} (returns when stopped)
    GET  /logs?follow=0|1              the engine's log, one line per line, until the end
    GET  /settings                     {"settings": the snapshot in force, "path": the file}
    POST /settings {"changes": {K: V}} the same after `store.update`, plus {"status": ...}
    GET  /keys                         {"keys": [ApiKey.public_dict(), ...]}
    POST /keys/create {"name": N}      {"key": public_dict, "secret": the key, shown once}
    POST /keys/revoke {"key": NAME-or-ID}  {"key": public_dict}
    POST /pull                         one JSON object a line: {"progress": [done, total]} while
                                       bytes move, then {"pulled": {"image", "total"}} or
                                       {"skipped": why} or {"error", "hint", "exit_code"}
    POST /bench   BenchRequest's fields one JSON object a line: {"progress": BenchState} while it
                                       runs, then {"outcome": {"state", "id", "profile",
                                       "result"}} or {"error", "hint", "exit_code"}; a terminal
                                       that goes away cancels the run
    POST /bench/cancel                 {"cancelled": true|false (none was running)}
    GET  /bench/runs                   {"runs": [stored run, newest first]}
    POST /tune    TuneRequest's fields one JSON object a line: {"progress": TuneState} while it
                                       runs (the first says the engine is stopped and for how
                                       long), then {"outcome": TuneOutcome} or {"error", ...};
                                       a terminal that goes away does not cancel it (hours of
                                       GPU time); `tune-moe` cancels on Ctrl-C through
    POST /tune/cancel                  {"cancelled": true|false (none was running)}
    GET  /tune                         {"running": TuneState|null, "configs": tuned_configs()}

A failure is HTTP 500 with {"error", "hint", "exit_code"}: the CLI raises the same kind of error
(`_error_from`), so its message and exit code are those of the command run without a service.
"""

from __future__ import annotations

import contextlib
import dataclasses
import http.client
import http.server
import json
import logging
import os
import socket
import socketserver
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, cast
from urllib.parse import parse_qs, urlsplit

from appliance import endpoint
from appliance import settings as st
from appliance.bench import tune
from appliance.bench.errors import BenchError, TunedConfigError
from appliance.bench.runner import (
    BenchOutcome,
    BenchRequest,
    BenchRunner,
    BenchState,
    BenchTarget,
    ContainerLauncher,
    Launcher,
    ProcessLauncher,
)
from appliance.bench.store import StoredRun
from appliance.bench.tuning import (
    ContainerTunerLauncher,
    TuneOutcome,
    TuneRequest,
    TunerLauncher,
    TuneRunner,
    TuneState,
    TuneTarget,
    last_install,
)
from appliance.engine.protocol import EngineReader
from appliance.engine.spec import hf_cache_root, is_local_model
from appliance.engine.state import EngineState, EngineStatus, PhaseRecord
from appliance.errors import ApplianceError, EngineError, SettingsError
from appliance.keys import ApiKey, KeyStore, NewKey

if TYPE_CHECKING:
    from appliance.engine.docker_runtime import DockerRuntime
    from appliance.engine.runtime import Runtime
    from appliance.engine.supervisor import Supervisor

log = logging.getLogger(__name__)

SOCKET_NAME = "control.sock"
LONG_POLL_MAX_S = 30.0
CONNECT_TIMEOUT_S = 5.0
# How long the control server waits for a connection before it looks for a shutdown (stop()
# wakes it at once): idle, it wakes this often.
POLL_S = 5.0


class EngineCommands(EngineReader, Protocol):
    """What the CLI asks of the engine's owner: the service's supervisor through the socket
    (ServiceSupervisor) or a Supervisor of the CLI's own. The status and its long poll are the
    engine's protocol (engine/protocol.py); the rest is the CLI's own."""

    settings: st.Settings

    def attach(self) -> EngineStatus: ...

    def start(self, profile: str | None = None) -> EngineStatus: ...

    def stop(self, timeout_s: float | None = None) -> EngineStatus: ...

    def iter_logs(self, *, follow: bool, stop: threading.Event | None = None) -> Iterator[str]: ...

    def close(self) -> None: ...


def socket_path() -> Path:
    return endpoint.private_socket_dir("control", "service") / SOCKET_NAME


# ------------------------------------------------------------------------------ the server


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    supervisor: Supervisor
    store: st.SettingsStore
    keys: KeyStore | None
    bench: BenchRunner | None
    tune: TuneRunner | None
    gpu_name: Callable[[], str]


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.0"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the stdlib's name
        log.debug("control: " + format, *args)

    # http.server passes a Unix socket's peer address as "" or a path: keep the log readable
    def address_string(self) -> str:
        return "control"

    def _send(self, status: int, payload: dict[str, Any]) -> None:
        body = json.dumps(payload, default=str).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _error(self, err: Exception) -> None:
        if isinstance(err, ApplianceError):
            payload = {"error": err.message, "hint": err.hint, "exit_code": err.exit_code}
        else:
            log.exception("control request failed")
            payload = {"error": f"{type(err).__name__}: {err}", "hint": "", "exit_code": 1}
        self._send(500, payload)

    def _body(self) -> dict[str, Any]:
        length = int(self.headers.get("Content-Length") or 0)
        if not length:
            return {}
        data = json.loads(self.rfile.read(min(length, 65536)))
        return data if isinstance(data, dict) else {}

    def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
        url = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        route = _GET_ROUTES.get(url.path)
        if route is None:
            self._send(404, {"error": f"no {url.path} here", "hint": "", "exit_code": 1})
            return
        try:
            route(self, query)
        except (ApplianceError, ValueError, OSError) as err:
            self._error(err)

    def do_POST(self) -> None:  # noqa: N802 - the stdlib's name
        url = urlsplit(self.path)
        route = _POST_ROUTES.get(url.path)
        if route is None:
            self._send(404, {"error": f"no {url.path} here", "hint": "", "exit_code": 1})
            return
        try:
            route(self, self._body())
        except (ApplianceError, ValueError, OSError) as err:
            self._error(err)

    # ------------------------------------------------------------------------------ engine

    def _get_status(self, query: dict[str, str]) -> None:
        sup = self.server.supervisor
        if "since" in query:
            timeout = min(float(query.get("timeout", "10")), LONG_POLL_MAX_S)
            status = sup.wait_for_change(int(query["since"]), timeout)
        else:
            status = sup.status()
        self._send(200, {"status": status.to_dict()})

    def _get_full_status(self, query: dict[str, str]) -> None:
        del query
        server = self.server
        self._send(
            200,
            _full_status(server.store.current(), server.supervisor, server.bench, server.tune),
        )

    def _get_logs(self, query: dict[str, str]) -> None:
        self._stream_logs(follow=query.get("follow") == "1")

    def _post_start(self, body: dict[str, Any]) -> None:
        # refused by the supervisor's start guard while MoE tuning holds the GPU
        profile = body.get("profile")
        status = self.server.supervisor.start(str(profile) if profile else None)
        self._send(200, {"status": status.to_dict()})

    def _post_stop(self, body: dict[str, Any]) -> None:
        del body
        self._send(200, {"status": self.server.supervisor.stop().to_dict()})

    # ---------------------------------------------------------------------------- settings

    def _settings_payload(self, settings: st.Settings) -> dict[str, Any]:
        return {"settings": settings.to_dict(), "path": str(self.server.store.path)}

    def _get_settings(self, query: dict[str, str]) -> None:
        del query
        self._send(200, self._settings_payload(self.server.store.current()))

    def _post_settings(self, body: dict[str, Any]) -> None:
        changes = body.get("changes")
        if not isinstance(changes, dict):
            raise SettingsError(
                "POST /settings takes {'changes': {'section.field': value}}.",
                hint="Use `step-station config set KEY VALUE`.",
            )
        new = self.server.store.update(changes)  # the supervisor took it before this returns
        status = self.server.supervisor.status()
        self._send(200, {**self._settings_payload(new), "status": status.to_dict()})

    # -------------------------------------------------------------------------------- keys

    def _keys(self) -> KeyStore:
        if self.server.keys is None:
            raise EngineError("This Step Station service keeps no API keys.")
        return self.server.keys

    def _get_keys(self, query: dict[str, str]) -> None:
        del query
        self._send(200, {"keys": [k.public_dict() for k in self._keys().list()]})

    def _post_create_key(self, body: dict[str, Any]) -> None:
        made = self._keys().create(str(body.get("name") or ""))
        self._send(200, {"key": made.record.public_dict(), "secret": made.secret})

    def _post_revoke_key(self, body: dict[str, Any]) -> None:
        record = self._keys().revoke(str(body.get("key") or ""))
        self._send(200, {"key": record.public_dict()})

    # -------------------------------------------------------------------------------- pull

    def _post_pull(self, body: dict[str, Any]) -> None:
        del body
        runtime = self.server.supervisor.runtime
        if runtime.kind != "docker":
            self._send(200, {"skipped": NO_IMAGE})
            return
        image = self.server.store.current().engine.image
        self.send_response(200)
        self.send_header("Content-Type", "application/x-ndjson")
        self.end_headers()

        def line(payload: dict[str, Any]) -> None:
            self.wfile.write(json.dumps(payload).encode() + b"\n")
            self.wfile.flush()

        try:
            total = pull_image(runtime, image, lambda done, size: line({"progress": [done, size]}))
        except ApplianceError as err:
            line({"error": err.message, "hint": err.hint, "exit_code": err.exit_code})
            return
        except (BrokenPipeError, ConnectionResetError):
            return  # the terminal went away; the pull it asked for ended with it
        line({"pulled": {"image": image, "total": total}})

    def _stream_logs(self, *, follow: bool) -> None:
        stop = threading.Event()
        lines = self.server.supervisor.iter_logs(follow=follow, stop=stop)
        try:
            first = next(lines, None)
        except ApplianceError as err:
            self._error(err)
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.end_headers()
        try:
            if first is not None:
                self.wfile.write(first.rstrip("\n").encode() + b"\n")
                self.wfile.flush()
            for line in lines:
                self.wfile.write(line.rstrip("\n").encode() + b"\n")
                self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            pass  # the terminal went away (Ctrl-C on `logs -f`)
        finally:
            stop.set()

    # ------------------------------------------------------------------------------- bench

    def _bench(self) -> BenchRunner:
        if self.server.bench is None:
            raise BenchError("This Step Station service runs no benchmarks.")
        return self.server.bench

    def _post_bench(self, body: dict[str, Any]) -> None:
        bench = self._bench()
        request = BenchRequest.from_dict(body)
        bench.ensure_idle()  # before the stream starts: a plain HTTP error
        target = bench_target(
            self.server.supervisor, self.server.store.current(), self.server.gpu_name()
        )
        self.send_response(200)
        self.send_header("Content-Type", "application/x-ndjson")
        self.end_headers()

        def line(payload: dict[str, Any]) -> None:
            self.wfile.write(json.dumps(payload, default=str).encode() + b"\n")
            self.wfile.flush()

        def progress(state: BenchState) -> None:
            try:
                line({"progress": state.to_dict()})
            except OSError:  # the terminal went away (Ctrl-C): its run goes with it
                bench.cancel()

        try:
            outcome = bench.run(request, target, progress)
        except ApplianceError as err:
            with contextlib.suppress(OSError):
                line({"error": err.message, "hint": err.hint, "exit_code": err.exit_code})
            return
        with contextlib.suppress(OSError):
            line({"outcome": outcome_dict(outcome)})

    def _post_bench_cancel(self, body: dict[str, Any]) -> None:
        del body
        self._send(200, {"cancelled": self._bench().cancel()})

    def _get_bench_runs(self, query: dict[str, str]) -> None:
        del query
        self._send(200, {"runs": [run_dict(r) for r in self._bench().list_runs()]})

    # -------------------------------------------------------------------------------- tune

    def _tune(self) -> TuneRunner:
        if self.server.tune is None:
            raise TunedConfigError("This Step Station service does not tune MoE kernels.")
        return self.server.tune

    def _post_tune(self, body: dict[str, Any]) -> None:
        runner = self._tune()
        request = TuneRequest.from_dict(body)
        runner.ensure_idle()  # before the stream starts: plain HTTP errors
        if self.server.bench is not None:
            self.server.bench.ensure_idle()
        supervisor = self.server.supervisor
        target = tune_target(supervisor, self.server.store.current(), self.server.gpu_name())
        self.send_response(200)
        self.send_header("Content-Type", "application/x-ndjson")
        self.end_headers()
        watching = [True]

        def line(payload: dict[str, Any]) -> None:
            if not watching[0]:
                return
            try:
                self.wfile.write(json.dumps(payload, default=str).encode() + b"\n")
                self.wfile.flush()
            except OSError:
                watching[0] = False  # the terminal went away; the tuning goes on

        try:
            outcome = runner.run(
                request,
                target,
                lambda message: supervisor.stop(),
                lambda state: line({"progress": state.to_dict()}),
            )
        except ApplianceError as err:
            line({"error": err.message, "hint": err.hint, "exit_code": err.exit_code})
            return
        line({"outcome": outcome.to_dict()})

    def _post_tune_cancel(self, body: dict[str, Any]) -> None:
        del body
        self._send(200, {"cancelled": self._tune().cancel()})

    def _get_tune(self, query: dict[str, str]) -> None:
        del query
        runner = self._tune()
        state = runner.current()
        configs = tuned_configs(
            runner.folder,
            self.server.supervisor,
            self.server.store.current(),
            self.server.gpu_name(),
        )
        self._send(200, {"running": state.to_dict() if state else None, "configs": configs})


_GET_ROUTES: dict[str, Callable[[_Handler, dict[str, str]], None]] = {
    "/status": _Handler._get_status,
    "/status/full": _Handler._get_full_status,
    "/logs": _Handler._get_logs,
    "/settings": _Handler._get_settings,
    "/keys": _Handler._get_keys,
    "/bench/runs": _Handler._get_bench_runs,
    "/tune": _Handler._get_tune,
}
_POST_ROUTES: dict[str, Callable[[_Handler, dict[str, Any]], None]] = {
    "/start": _Handler._post_start,
    "/stop": _Handler._post_stop,
    "/settings": _Handler._post_settings,
    "/keys/create": _Handler._post_create_key,
    "/keys/revoke": _Handler._post_revoke_key,
    "/pull": _Handler._post_pull,
    "/bench": _Handler._post_bench,
    "/bench/cancel": _Handler._post_bench_cancel,
    "/tune": _Handler._post_tune,
    "/tune/cancel": _Handler._post_tune_cancel,
}

NO_IMAGE = "engine.runtime is not docker: there is no image to pull."


def pull_image(runtime: Runtime, image: str, on_progress: Callable[[int, int], None]) -> int:
    """Pull `image` with the engine's runtime, reporting (bytes done, bytes total); returns the
    bytes downloaded. Used by `step-station pull` alone and by the service for it."""
    from appliance.engine.spec import LaunchSpec

    spec = LaunchSpec(
        name="pull", image=image, args=(), profile="", served_model_name="", host_port=0
    )
    seen = [0]

    def progress(done: int, total: int, line: str) -> None:
        del line
        seen[0] = total
        on_progress(done, total)

    runtime.ensure_image(spec, progress)
    return seen[0]


def _full_status(
    settings: st.Settings,
    supervisor: Supervisor,
    bench: BenchRunner | None = None,
    tuner: TuneRunner | None = None,
) -> dict[str, Any]:
    from appliance.monitoring.status import status_report

    data, lines = status_report(supervisor.status(), settings, supervisor)
    data["bench"], line = bench_status(bench)
    if line:
        lines.append(line)
    data["tune"], line = tune_status(tuner)
    if line:
        lines.append(line)
    return {"json": data, "lines": lines}


def bench_status(bench: BenchRunner | None) -> tuple[dict[str, Any] | None, str]:
    """The `bench` key of the status (None when no benchmark runs) and its status line: the
    dashboard and `status` say a benchmark is loading the engine."""
    state = bench.current() if bench is not None else None
    if state is None:
        return None, ""
    done = f" {state.done}/{state.total} requests" if state.total else ""
    via = " through the gateway" if state.through_gateway else ""
    return state.to_dict(), f"Benchmark: {state.preset} running{via},{done} {state.elapsed_s:.0f} s"


def tune_status(tuner: TuneRunner | None) -> tuple[dict[str, Any] | None, str]:
    """The `tune` key of the status (None when no tuning runs) and its line: `status` says why
    the engine is stopped."""
    state = tuner.current() if tuner is not None else None
    if state is None:
        return None, ""
    return state.to_dict(), (
        f"MoE tuning running (the engine is stopped meanwhile): {state.done}/{state.total} "
        f"batch sizes, {state.elapsed_s / 60:.0f} min"
    )


# ---------------------------------------------------------------------------------- bench


def bench_target(supervisor: Supervisor, settings: st.Settings, gpu_name: str = "") -> BenchTarget:
    """The running engine as `vllm bench serve` needs it, from what the supervisor knows and what
    the engine itself answers (`/v1/models`: the checkpoint and the window; `/version`)."""
    status: EngineStatus = supervisor.status()
    if status.state == EngineState.SLEEPING:
        supervisor.ensure_awake()
        status = supervisor.status()
    if status.state != EngineState.READY:
        raise BenchError(
            f"The engine is not serving ({status.state.label.lower()}); there is nothing to "
            "benchmark.",
            hint="Start it with `step-station start` and run the benchmark once it is ready.",
        )
    url, key = supervisor.engine_url, supervisor.engine_api_key
    model, context_len, version = _engine_facts(url, key)
    eff = status.effective
    runtime = supervisor.runtime.kind
    image = str(eff.get("image") or settings.engine.image) if runtime == "docker" else ""
    command = [str(part) for part in eff.get("command") or []]
    return BenchTarget(
        engine_url=url,
        api_key=key,
        served_model_name=supervisor.served_model_name,
        model=model or str(eff.get("model") or ""),
        context_len=context_len or int(eff.get("max_model_len") or 0),
        profile=status.profile,
        runtime=runtime,
        program=_bench_program(command) if runtime == "process" else "",
        image=image,
        image_digest=_image_digest(supervisor.runtime, image),
        vllm_version=version or str(eff.get("vllm_version") or ""),
        gpu_name=gpu_name,
        flags={"mtp": "--speculative-config" in command},
        gateway_url=f"http://127.0.0.1:{settings.gateway.port}",
        hf_cache=str(hf_cache_root(settings.engine)),
        model_dir=_model_dir(settings.engine),
    )


def _model_dir(engine: st.EngineSettings) -> str:
    """The host folder of a local checkpoint (`engine.model_override`), as the launch spec
    mounts it; "" for a Hub id."""
    override = engine.model_override
    if not override or not is_local_model(override):
        return ""
    return str(Path(override).expanduser().resolve())


def _engine_facts(url: str, key: str) -> tuple[str, int, str]:
    """(checkpoint, context window, vLLM version) as the engine reports them; vLLM's
    `/v1/models` gives `root` (the model it loaded) and `max_model_len`, `/version` its
    version (vllm/entrypoints/openai/.../protocol: `ModelCard`, 0.32)."""
    import httpx

    try:
        with endpoint.client(url, timeout=10.0) as http:
            models = http.get("/v1/models", headers={"Authorization": f"Bearer {key}"}).json()
            version = http.get("/version").json()
        first = (models.get("data") or [{}])[0]
        return (
            str(first.get("root") or ""),
            int(first.get("max_model_len") or 0),
            str(version.get("version") or ""),
        )
    except (httpx.HTTPError, ValueError, AttributeError, IndexError) as err:
        raise BenchError(
            f"The engine did not say which model it serves ({err}).",
            hint="`step-station status` shows whether it is ready.",
        ) from err


def _bench_program(command: list[str]) -> str:
    """The `vllm` beside the engine's: the engine's own program when it is a `vllm` (its
    `bench serve` is the same wheel's), else the one on PATH."""
    if command and Path(command[0]).name == "vllm":
        return command[0]
    import shutil

    return shutil.which("vllm") or "vllm"


def _image_digest(runtime: Runtime, image: str) -> str:
    if not image:
        return ""
    try:
        return str(runtime.image_digest(image))
    except ApplianceError:
        return ""


def launcher_for(runtime: Runtime) -> Callable[[BenchTarget], Launcher]:
    """How the bench runs beside the engine's runtime: a sibling container under Docker (with
    the runtime's own client: only docker_runtime imports docker), a process otherwise."""
    if runtime.kind == "docker":
        docker_runtime = cast("DockerRuntime", runtime)  # its client is made when first asked
        return lambda target: ContainerLauncher(target, docker_runtime.client)
    return ProcessLauncher


# ----------------------------------------------------------------------------------- tune


def tune_target(supervisor: Supervisor, settings: st.Settings, gpu_name: str = "") -> TuneTarget:
    """The engine as vLLM's MoE tuner needs it: its image and GPU from the launch spec the next
    start would use, and the expert shape from the checkpoint's own config.json on disk."""
    from appliance.engine.compat import model_folder
    from appliance.engine.launch import launch_spec_for

    if supervisor.runtime.kind != "docker":
        raise TunedConfigError(
            "MoE tuning runs vLLM's tuner script from the engine image, and this engine runs "
            "as a process (the pip wheel has no tuner).",
            hint="Use the Docker engine (`step-station config set engine.runtime docker`).",
        )
    spec = launch_spec_for(settings, runtime="docker", download_weights=False, secrets=st.Secrets())
    config = _checkpoint_config(model_folder(spec), spec.model)
    text = config.get("text_config")
    text_config = dict(text) if isinstance(text, dict) else config
    quant = config.get("quantization_config") or text_config.get("quantization_config") or {}
    if not isinstance(quant, dict) or quant.get("quant_method") != "fp8":
        method = quant.get("quant_method") if isinstance(quant, dict) else None
        raise TunedConfigError(
            f"The engine's checkpoint ({spec.model}) is not the FP8 one (quant_method "
            f"{method!r}); vLLM's tuned Triton MoE configs serve the FP8 checkpoint only.",
            hint="Pick the fp8-tp1 profile and start it once (it downloads the checkpoint), "
            "then tune.",
        )
    block = quant.get("weight_block_size")
    block_shape = (
        (int(block[0]), int(block[1])) if isinstance(block, list) and len(block) == 2 else None
    )
    gpu_uuid = spec.gpus[0] if spec.gpus else ""
    return TuneTarget(
        image=spec.image,
        gpu_uuid=gpu_uuid,
        gpu_name=gpu_name or _gpu_name_of(gpu_uuid),
        text_config=text_config,
        block_shape=block_shape,
        image_digest=_image_digest(supervisor.runtime, spec.image),
        request_gpu=spec.gpus is not None,
    )


def _checkpoint_config(folder: Path | None, model: str) -> dict[str, Any]:
    path = folder / "config.json" if folder is not None else None
    try:
        data = json.loads(path.read_text(encoding="utf-8")) if path else None
    except (OSError, ValueError) as err:
        raise TunedConfigError(f"The checkpoint's {path} cannot be read ({err}).") from err
    if not isinstance(data, dict):
        raise TunedConfigError(
            f"The checkpoint {model} is not on this machine yet: tuning reads its config.json "
            "for the expert shape.",
            hint="Start the engine once (`step-station start`) so that it is downloaded.",
        )
    return data


def _gpu_name_of(uuid: str) -> str:
    """The GPU's name from NVML ("" without one): vLLM names config files after it."""
    from appliance import hardware

    gpus = hardware.detect().gpus
    chosen = next((g for g in gpus if g.uuid == uuid), gpus[0] if gpus else None)
    return chosen.name if chosen is not None else ""


def tune_launcher_for(runtime: Runtime) -> Callable[[TuneTarget], TunerLauncher]:
    """The tuner beside the engine: a sibling container with the runtime's own client."""
    docker_runtime = cast("DockerRuntime", runtime)
    return lambda target: ContainerTunerLauncher(target, docker_runtime.client)


def tuned_configs(
    folder: Path, supervisor: Supervisor, settings: st.Settings, gpu_name: str = ""
) -> dict[str, Any]:
    """What `GET /tune` and `tune-moe --status` show: the file vLLM would load for this GPU and
    shape (when the checkpoint is on disk to say the shape), and every file in the folder."""
    data: dict[str, Any] = {"folder": str(folder), "expected": None, "note": ""}
    try:
        target = tune_target(supervisor, settings, gpu_name)
        shape = tune.moe_shape(target.text_config, dtype="fp8_w8a8", block_shape=target.block_shape)
        found = tune.find_config(folder, shape, target.gpu_name)
        data["gpu_name"] = target.gpu_name
        record = last_install(folder, found.file_name)
        data["expected"] = {
            "file_name": found.file_name,
            "exists": found.exists,
            "usable": found.usable,
            "problems": list(found.file.problems) if found.file else [],
            "batch_sizes": list(found.file.batch_sizes) if found.file else [],
            "triton_version": found.file.triton_version if found.file else "",
            "installed_at": record.installed_at if record else None,
            "image_digest": record.image_digest if record else "",
            "same_image": bool(record and record.image_digest == target.image_digest),
        }
    except ApplianceError as err:
        data["note"] = err.message
    data["files"] = [
        {"name": f.path.name, "usable": f.usable, "problems": list(f.problems)}
        for f in tune.read_folder(folder)
    ]
    return data


def outcome_dict(outcome: BenchOutcome) -> dict[str, Any]:
    return {
        "state": outcome.state,
        "id": outcome.id,
        "profile": outcome.profile,
        "result": dict(outcome.result),
    }


def outcome_from_dict(data: dict[str, Any]) -> BenchOutcome:
    return BenchOutcome(
        state=str(data.get("state") or ""),
        id=data.get("id"),
        profile=str(data.get("profile") or ""),
        result=dict(data.get("result") or {}),
    )


def run_dict(run: StoredRun) -> dict[str, Any]:
    info = run.info
    return {
        "id": run.id,
        "created_at": run.created_at,
        "profile": info.profile,
        "preset": info.preset,
        "flags": dict(info.flags),
        "image_digest": info.image_digest,
        "vllm_version": info.vllm_version,
        "gpu_name": info.gpu_name,
        "args": list(info.args),
        "result": dict(run.raw),
    }


def run_from_dict(data: dict[str, Any]) -> StoredRun:
    from appliance.bench.store import RunInfo

    return StoredRun(
        id=int(data["id"]),
        created_at=float(data.get("created_at") or 0.0),
        info=RunInfo(
            profile=str(data.get("profile") or ""),
            preset=str(data.get("preset") or ""),
            args=tuple(data.get("args") or ()),
            flags=dict(data.get("flags") or {}),
            image_digest=str(data.get("image_digest") or ""),
            vllm_version=str(data.get("vllm_version") or ""),
            gpu_name=str(data.get("gpu_name") or ""),
        ),
        raw=dict(data.get("result") or {}),
    )


class ControlServer:
    """The service's end: serves the supervisor on the private socket from a thread."""

    def __init__(
        self,
        supervisor: Supervisor,
        store: st.SettingsStore,
        *,
        keys: KeyStore | None = None,
        bench: BenchRunner | None = None,
        tune: TuneRunner | None = None,
        gpu_name: Callable[[], str] = str,
    ) -> None:
        self.supervisor = supervisor
        self.store = store
        self.keys = keys
        self.bench = bench
        self.tune = tune
        self.gpu_name = gpu_name
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self.path: Path | None = None

    def start(self) -> Path:
        path = socket_path()
        endpoint.prepare_private_dir(path.parent)
        if _answers(path):
            raise EngineError(
                f"Another Step Station service already answers on {path}.",
                hint="Stop it first (`systemctl --user stop step-station`), or use that one.",
            )
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # left by a service that is gone
        # Not os.umask(): it is the whole process's, and the supervisor's threads create folders
        # meanwhile (a folder made under umask 0177 cannot be entered). The 0700 folder keeps
        # others out during the moment between bind and chmod.
        server = _Server(str(path), _Handler)
        os.chmod(path, 0o600)
        server.supervisor = self.supervisor
        server.store = self.store
        server.keys = self.keys
        server.bench = self.bench
        server.tune = self.tune
        server.gpu_name = self.gpu_name
        self._server = server
        self.path = path
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": POLL_S},
            name="control",
            daemon=True,
        )
        self._thread.start()
        return path

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        # serve_forever sees shutdown() only between its waits for a connection (POLL_S): a
        # connection of our own ends the wait at once.
        stopper = threading.Thread(target=server.shutdown, name="control-stop", daemon=True)
        stopper.start()
        while stopper.is_alive():
            if self.path is not None:
                with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as poke:
                    poke.settimeout(0.5)
                    poke.connect(str(self.path))
            stopper.join(0.05)
        server.server_close()
        if self.path is not None:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()


def _answers(path: Path) -> bool:
    try:
        return endpoint.socket_answers(path)
    except OSError:
        return False


# ------------------------------------------------------------------------------ the client


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("control", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self._path)
        self.sock = sock


def _error_classes(base: type[ApplianceError] = ApplianceError) -> list[type[ApplianceError]]:
    found: list[type[ApplianceError]] = []
    for sub in base.__subclasses__():
        found += [sub, *_error_classes(sub)]
    return found


def _error_from(data: dict[str, Any], status: int) -> ApplianceError:
    """The service's error as the same kind of error here (so the CLI's exit code matches)."""
    code = int(data.get("exit_code") or EngineError.exit_code)
    # the base class first: code 1 is no subclass's own (whichever happens to be imported)
    kinds: list[type[ApplianceError]] = [ApplianceError, *_error_classes()]
    kind = next((c for c in kinds if c.exit_code == code), EngineError)
    return kind(str(data.get("error") or f"HTTP {status}"), hint=str(data.get("hint") or ""))


def status_from_dict(data: dict[str, Any]) -> EngineStatus:
    """The inverse of `EngineStatus.to_dict()`."""
    progress = data.get("progress")
    return EngineStatus(
        state=EngineState(data.get("state", "absent")),
        phase=str(data.get("phase", "")),
        phases=[
            PhaseRecord(
                name=p["name"],
                started_at=float(p.get("started_at") or 0.0),
                elapsed_s=float(p.get("elapsed_s") or 0.0),
                done=bool(p.get("done")),
                detail=str(p.get("detail") or ""),
            )
            for p in data.get("phases") or []
        ],
        profile=str(data.get("profile", "")),
        runtime=str(data.get("runtime", "")),
        container_id=str(data.get("container_id", "")),
        container_name=str(data.get("container_name", "")),
        engine_url=str(data.get("engine_url", "")),
        served_model_name=str(data.get("served_model_name", "")),
        message=str(data.get("message", "")),
        progress=(int(progress[0]), int(progress[1])) if progress else None,
        log_tail=list(data.get("log_tail") or []),
        started_at=data.get("started_at"),
        ready_at=data.get("ready_at"),
        exit_code=data.get("exit_code"),
        oom=bool(data.get("oom")),
        restart_needed=bool(data.get("restart_needed")),
        retry_note=str(data.get("retry_note", "")),
        notes=list(data.get("notes") or []),
        effective=dict(data.get("effective") or {}),
        version=int(data.get("version") or 0),
    )


@dataclass(frozen=True)
class SettingsChange:
    """What the service says after `config set`: its snapshot, its file, its engine."""

    settings: st.Settings
    path: Path
    status: EngineStatus


@dataclass(frozen=True)
class PullOutcome:
    image: str = ""
    total: int = 0  # bytes downloaded
    skipped: str = ""  # why nothing was pulled (not a Docker runtime)


class ServiceClient:
    """The CLI's end of the running service's control socket."""

    PULL_READ_TIMEOUT_S = 900.0  # a pull may go quiet for a while between progress lines

    def __init__(self, path: Path) -> None:
        self.path = path

    def _call(
        self, method: str, route: str, body: dict[str, Any] | None = None, timeout: float = 30.0
    ) -> dict[str, Any]:
        conn = _UnixConnection(str(self.path), timeout)
        try:
            payload = json.dumps(body).encode() if body is not None else None
            headers = {"Content-Type": "application/json"} if payload is not None else {}
            conn.request(method, route, body=payload, headers=headers)
            response = conn.getresponse()
            data = json.loads(response.read() or b"{}")
        except (OSError, http.client.HTTPException, ValueError) as err:
            raise self._gone(err) from err
        finally:
            conn.close()
        if not isinstance(data, dict):
            raise EngineError(f"The Step Station service answered {data!r}.")
        if response.status != 200:
            raise _error_from(data, response.status)
        return data

    def _gone(self, err: Exception) -> EngineError:
        return EngineError(
            f"The Step Station service stopped answering on {self.path} ({err}).",
            hint="`systemctl --user status step-station` shows why; the command works "
            "without the service too.",
        )

    # ---------------------------------------------------------------------------- settings

    def update_settings(self, changes: dict[str, Any]) -> SettingsChange:
        """`store.update(changes)` in the service: validated, saved, and in force there."""
        data = self._call("POST", "/settings", {"changes": changes})
        return SettingsChange(
            settings=st.from_dict(data["settings"]),
            path=Path(str(data["path"])),
            status=status_from_dict(data["status"]),
        )

    # -------------------------------------------------------------------------------- keys

    def keys(self) -> ServiceKeys:
        return ServiceKeys(self)

    def bench(self) -> ServiceBench:
        return ServiceBench(self)

    def tune(self) -> ServiceTune:
        return ServiceTune(self)

    # -------------------------------------------------------------------------------- pull

    def pull(self, on_progress: Callable[[int, int], None]) -> PullOutcome:
        """Pull the engine image through the service, reporting (bytes done, bytes total)."""
        conn = _UnixConnection(str(self.path), self.PULL_READ_TIMEOUT_S)
        try:
            conn.request("POST", "/pull", body=b"{}", headers={"Content-Type": "application/json"})
            response = conn.getresponse()
            if response.status != 200:
                raise _error_from(json.loads(response.read() or b"{}"), response.status)
            if response.getheader("Content-Type", "") == "application/json":
                return PullOutcome(skipped=str(json.loads(response.read())["skipped"]))
            return _read_pull(response, on_progress)
        except (OSError, http.client.HTTPException, ValueError) as err:
            raise self._gone(err) from err
        finally:
            conn.close()


def _read_pull(
    response: http.client.HTTPResponse, on_progress: Callable[[int, int], None]
) -> PullOutcome:
    while line := response.readline():
        data = json.loads(line)
        if "progress" in data:
            done, total = data["progress"]
            on_progress(int(done), int(total))
        elif "pulled" in data:
            return PullOutcome(str(data["pulled"]["image"]), int(data["pulled"]["total"]))
        elif "error" in data:
            raise _error_from(data, 500)
    raise EngineError("The Step Station service ended the pull without saying how it went.")


class ServiceBench:
    """The service's BenchRunner over the socket: `run` streams progress, `cancel`, `list_runs`."""

    READ_TIMEOUT_S = 900.0  # the long preset's one prompt may take minutes between frames

    def __init__(self, client: ServiceClient) -> None:
        self.client = client

    def run(
        self, request: BenchRequest, on_progress: Callable[[BenchState], None] | None = None
    ) -> BenchOutcome:
        conn = _UnixConnection(str(self.client.path), self.READ_TIMEOUT_S)
        try:
            body = json.dumps(dataclasses.asdict(request)).encode()
            conn.request("POST", "/bench", body=body, headers={"Content-Type": "application/json"})
            response = conn.getresponse()
            if response.status != 200:
                raise _error_from(json.loads(response.read() or b"{}"), response.status)
            while line := response.readline():
                data = json.loads(line)
                if "progress" in data and on_progress is not None:
                    on_progress(BenchState(**data["progress"]))
                elif "outcome" in data:
                    return outcome_from_dict(data["outcome"])
                elif "error" in data:
                    raise _error_from(data, 500)
        except (OSError, http.client.HTTPException, ValueError) as err:
            raise self.client._gone(err) from err
        finally:
            conn.close()
        raise BenchError("The Step Station service ended the benchmark without saying how it went.")

    def cancel(self) -> bool:
        return bool(self.client._call("POST", "/bench/cancel", {})["cancelled"])

    def list_runs(self) -> list[StoredRun]:
        return [run_from_dict(r) for r in self.client._call("GET", "/bench/runs")["runs"]]


class ServiceTune:
    """The service's TuneRunner over the socket: `run` streams progress, `cancel`, `status`."""

    READ_TIMEOUT_S = 24 * 3600.0  # a batch size may take many minutes between progress lines

    def __init__(self, client: ServiceClient) -> None:
        self.client = client

    def run(
        self, request: TuneRequest, on_progress: Callable[[TuneState], None] | None = None
    ) -> TuneOutcome:
        conn = _UnixConnection(str(self.client.path), self.READ_TIMEOUT_S)
        try:
            body = json.dumps(dataclasses.asdict(request)).encode()
            conn.request("POST", "/tune", body=body, headers={"Content-Type": "application/json"})
            response = conn.getresponse()
            if response.status != 200:
                raise _error_from(json.loads(response.read() or b"{}"), response.status)
            while line := response.readline():
                data = json.loads(line)
                if "progress" in data and on_progress is not None:
                    on_progress(TuneState(**data["progress"]))
                elif "outcome" in data:
                    out = data["outcome"]
                    out["batch_sizes"] = tuple(out.get("batch_sizes") or ())
                    return TuneOutcome(**out)
                elif "error" in data:
                    raise _error_from(data, 500)
        except (OSError, http.client.HTTPException, ValueError) as err:
            raise self.client._gone(err) from err
        finally:
            conn.close()
        raise TunedConfigError("The Step Station service ended the tuning without saying how.")

    def cancel(self) -> bool:
        return bool(self.client._call("POST", "/tune/cancel", {})["cancelled"])

    def status(self) -> dict[str, Any]:
        return self.client._call("GET", "/tune")


class ServiceKeys:
    """The service's KeyStore over the socket: `create`, `revoke`, `list` as on a KeyStore."""

    def __init__(self, client: ServiceClient) -> None:
        self.client = client

    def create(self, name: str) -> NewKey:
        data = self.client._call("POST", "/keys/create", {"name": name})
        return NewKey(record=ApiKey.from_public(data["key"]), secret=str(data["secret"]))

    def revoke(self, name_or_id: str) -> ApiKey:
        return ApiKey.from_public(
            self.client._call("POST", "/keys/revoke", {"key": name_or_id})["key"]
        )

    def list(self) -> list[ApiKey]:
        return [ApiKey.from_public(k) for k in self.client._call("GET", "/keys")["keys"]]


class ServiceSupervisor(ServiceClient):
    """The CLI's handle on the running service's supervisor: the calls the CLI makes on a local
    Supervisor (attach, start, stop, status, wait_for_change, iter_logs), sent over the socket."""

    remote = True

    def __init__(self, path: Path, settings: st.Settings) -> None:
        super().__init__(path)
        self.settings = settings

    def status(self) -> EngineStatus:
        return status_from_dict(self._call("GET", "/status")["status"])

    def attach(self) -> EngineStatus:
        return self.status()  # the service attached when it started

    def wait_for_change(self, since_version: int, timeout_s: float) -> EngineStatus:
        timeout = min(max(timeout_s, 0.0), LONG_POLL_MAX_S)
        route = f"/status?since={since_version}&timeout={timeout}"
        return status_from_dict(self._call("GET", route, timeout=timeout + 30)["status"])

    def start(self, profile: str | None = None) -> EngineStatus:
        return status_from_dict(self._call("POST", "/start", {"profile": profile})["status"])

    def stop(self, timeout_s: float | None = None) -> EngineStatus:
        del timeout_s  # the service's own engine.stop_timeout_s applies
        wait = float(self.settings.engine.stop_timeout_s) + 120
        return status_from_dict(self._call("POST", "/stop", {}, timeout=wait)["status"])

    def full_status(self) -> dict[str, Any]:
        return self._call("GET", "/status/full", timeout=60)

    def iter_logs(self, *, follow: bool, stop: threading.Event | None = None) -> Iterator[str]:
        conn = _UnixConnection(str(self.path), None if follow else 60.0)  # type: ignore[arg-type]
        try:
            conn.request("GET", f"/logs?follow={int(follow)}")
            response = conn.getresponse()
            if response.status != 200:
                raise _error_from(json.loads(response.read() or b"{}"), response.status)
            while stop is None or not stop.is_set():
                line = response.readline()
                if not line:
                    return
                yield line.decode(errors="replace").rstrip("\n")
        finally:
            conn.close()

    def close(self) -> None:
        return None


def running_service() -> ServiceClient | None:
    """The running service's control socket, or None when no service answers."""
    try:
        path = socket_path()
    except ApplianceError:
        return None
    if not _answers(path):
        return None
    return ServiceClient(path)


def service_supervisor(settings: st.Settings) -> ServiceSupervisor | None:
    """A handle on the running service's supervisor, or None when no service answers."""
    service = running_service()
    return None if service is None else ServiceSupervisor(service.path, settings)
