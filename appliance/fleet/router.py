"""`Fleet`: vLLM's router (`vllm-router`, vllm-project/router) run and supervised on loopback.

When the settings name members, the router runs as its own process on 127.0.0.1 with this
Station's own gateway (loopback) and every member's gateway as workers. The gateway sends a
client's request there (with the fleet key in place of the client's key, see members.py) only
while the router is up and its worker list is exactly the configured one; otherwise requests go
to the own engine as without a fleet. The router is restarted when it exits (at most
`MAX_RESTARTS` times in `RESTART_WINDOW_S`, then it is shown failed with its log's tail); its
output goes to `<cache>/logs/fleet-router.log`.

What the view shows comes from the router itself: `GET /workers` (health, load per worker) and
its Prometheus text (`vllm_router_cb_state`, `vllm_router_processed_requests_total`).

The router's pid and start time are kept in `<data>/fleet-router.pid`: a front killed with -9
leaves its router running (it is in a session of its own), and the next start stops that one
before starting its own.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from appliance import settings as st
from appliance.fleet.members import FleetKey, Member, parse_members

log = logging.getLogger("step_station.fleet")

LOOPBACK = "127.0.0.1"
POLL_S = 1.0
MAX_RESTARTS = 5
RESTART_WINDOW_S = 600.0
READY_TIMEOUT_S = 30.0
# How the router treats workers (vllm-router --help): a member that stops answering is marked
# unhealthy after two failed checks (one a second: one slow answer on a busy machine is not a
# failure), and its circuit opens after two failed requests.
ROUTER_FLAGS = (
    "--health-check-endpoint", "/health",
    "--health-check-interval-secs", "1",
    "--health-check-timeout-secs", "2",
    "--health-failure-threshold", "2",
    "--health-success-threshold", "1",
    "--cb-failure-threshold", "2",
    "--cb-success-threshold", "1",
    "--cb-timeout-duration-secs", "3",
    "--retry-max-retries", "3",
    "--retry-initial-backoff-ms", "20",
    "--worker-startup-timeout-secs", "2",
    "--worker-startup-check-interval", "1",
    "--queue-size", "1024",
    "--max-concurrent-requests", "1024",
    "--log-level", "warning",
)  # fmt: skip
_METRIC = re.compile(r'^(vllm_router_[a-z_]+)\{worker="([^"]+)"[^}]*\}\s+([0-9.eE+-]+)$')


@dataclass(frozen=True)
class MemberView:
    name: str
    url: str
    # "healthy"; "failed" (its health check fails); "recovering" (it answers health checks, but
    # its circuit breaker is still open or half-open after failed requests); "starting"
    state: str
    load: int = 0  # requests the router has in flight there
    routed: int = 0  # requests the router sent there since it started
    # the member's own report (`GET /fleet/load` on its gateway, every LOAD_EVERY_S): its
    # engine's requests running and waiting (from every client, not only this front's) and
    # KV-cache use; None when it did not answer
    running: int | None = None
    waiting: int | None = None
    kv_cache_pct: float | None = None


@dataclass(frozen=True)
class FleetView:
    router: str  # "off" (no members), "starting", "running", "restarting", "failed"
    policy: str = ""
    members: tuple[MemberView, ...] = ()
    message: str = ""

    def healthy_text(self) -> str:
        healthy = sum(m.state == "healthy" for m in self.members)
        return f"{healthy} of {len(self.members)} members healthy"


_MEMBER_FIELDS = {f.name for f in dataclasses.fields(MemberView)}
LOAD_EVERY_S = 2.0  # how often the front asks each healthy member for its load
LOAD_TIMEOUT_S = 1.0


def member_load(url: str, key: str) -> dict[str, Any]:
    """A member's `GET /fleet/load` (its gateway, with the fleet key), or {} when it fails."""
    request = urllib.request.Request(
        f"{url}/fleet/load", headers={"Authorization": f"Bearer {key}"}
    )
    try:
        with urllib.request.urlopen(request, timeout=LOAD_TIMEOUT_S) as response:  # noqa: S310
            data = json.loads(response.read())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def status_path() -> Path:
    return st.data_dir() / "fleet-status.json"


def view_dict(view: FleetView) -> dict[str, object]:
    return {
        "router": view.router,
        "policy": view.policy,
        "message": view.message,
        "members": [dataclasses.asdict(m) for m in view.members],
    }


def view_from_dict(data: dict[str, Any]) -> FleetView:
    return FleetView(
        router=str(data.get("router", "off")),
        policy=str(data.get("policy", "")),
        message=str(data.get("message", "")),
        members=tuple(
            MemberView(**{k: v for k, v in m.items() if k in _MEMBER_FIELDS})
            for m in data.get("members", [])
        ),
    )


def stop_orphan(pid_path: Path) -> bool:
    """Stop the router an earlier run of this Station left (its front was killed), if the pid in
    `pid_path` is still that process (same start time, a vllm-router). True when one was."""
    try:
        data = json.loads(pid_path.read_text())
        process = psutil.Process(int(data["pid"]))
        same = abs(process.create_time() - float(data["started"])) < 0.01
        same = same and any(Path(a).name == "vllm-router" for a in process.cmdline()[:2])
    except (OSError, ValueError, KeyError, TypeError, psutil.Error):
        return False
    finally:
        with contextlib.suppress(OSError):
            pid_path.unlink()
    if not same:
        return False
    log.warning("fleet: stopping vllm-router pid %d left by an earlier run", process.pid)
    with contextlib.suppress(psutil.Error):
        process.terminate()
        try:
            process.wait(timeout=5)
        except psutil.TimeoutExpired:
            process.kill()
    return True


def router_binary() -> str:
    """`vllm-router` beside this Python (the `fleet` extra installs it), else on PATH."""
    here = Path(sys.executable).parent / "vllm-router"
    if here.exists():
        return str(here)
    return shutil.which("vllm-router") or ""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def router_argv(
    binary: str, port: int, metrics_port: int, workers: list[str], policy: str
) -> list[str]:
    return [
        binary,
        "--host", LOOPBACK,
        "--port", str(port),
        "--prometheus-host", LOOPBACK,
        "--prometheus-port", str(metrics_port),
        "--policy", policy,
        *ROUTER_FLAGS,
        "--worker-urls", *workers,
    ]  # fmt: skip


@dataclass
class _Plan:
    members: tuple[Member, ...]
    own_url: str
    policy: str
    port: int

    @property
    def workers(self) -> list[str]:
        return [self.own_url, *(m.url for m in self.members)]


@dataclass
class _Run:
    plan: _Plan
    process: subprocess.Popen[bytes]
    port: int
    metrics_port: int
    started: float = field(default_factory=time.monotonic)
    ready: bool = False


class Fleet:
    """Owned by the gateway: `sync(settings, own_url)`, `route()`, `accepts(key)`, `view()`."""

    def __init__(self, key: FleetKey | None = None, log_path: Path | None = None) -> None:
        self.key = key or FleetKey()
        self.log_path = log_path or st.cache_dir() / "logs" / "fleet-router.log"
        self.status_path = status_path()
        self.pid_path = self.status_path.with_name("fleet-router.pid")
        self._orphan_checked = False
        self._written: FleetView | None = None
        self._lock = threading.RLock()
        self._plan: _Plan | None = None
        self._run: _Run | None = None
        self._restarts: deque[float] = deque()
        self._failed = ""
        self._view = FleetView(router="off")
        self._route: tuple[str, str] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._reports: dict[str, tuple[float, dict[str, Any]]] = {}

    # ------------------------------------------------------------------ what the gateway asks

    def accepts(self, presented: str) -> bool:
        """Is `presented` this Station's fleet key (a front's router asking for the own engine)?"""
        return self.key.accepts(presented)

    def active(self) -> bool:
        """Does this Station hold a fleet key (a front, or a member that joined)?"""
        return bool(self.key.value())

    def route(self) -> tuple[str, str] | None:
        """(the router's URL, the fleet key) while requests should go through the router."""
        return self._route

    def view(self) -> FleetView:
        return self._view

    def _publish(self) -> None:
        """Write the view for `step-station fleet list` (private, like every appliance file)."""
        view = self._view
        if view == self._written:
            return
        self._written = view
        with contextlib.suppress(OSError):
            st.private_dir(self.status_path.parent)
            st.write_private(self.status_path, json.dumps(view_dict(view)))

    # ----------------------------------------------------------------------------- lifecycle

    def sync(self, settings: st.Settings, own_url: str) -> None:
        """Run the router these settings ask for (none without members); restart it when the
        members, the policy or the own address changed."""
        members = parse_members(settings.fleet.members)
        plan = (
            _Plan(members, own_url.rstrip("/"), settings.fleet.policy, settings.fleet.router_port)
            if members
            else None
        )
        with self._lock:
            if plan == self._plan:
                return
            self._plan = plan
            self._restarts.clear()
            self._failed = ""
            self._stop_run()
            if not self._orphan_checked:
                self._orphan_checked = True
                stop_orphan(self.pid_path)
            if plan is None:
                self._view = FleetView(router="off")
                self._publish()
                return
            if not self.key.value():
                from appliance.fleet.members import ensure_key

                ensure_key(self.key.path)
            self._start_run()
            if self._thread is None:
                self._stop.clear()
                self._thread = threading.Thread(
                    target=self._supervise, name="step-station-fleet", daemon=True
                )
                self._thread.start()

    def close(self) -> None:
        with self._lock:
            self._plan = None
            self._stop.set()
            self._stop_run()
            self._view = FleetView(router="off")
            self._publish()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout=5)

    # ------------------------------------------------------------------------------ internals

    def _start_run(self) -> None:
        plan = self._plan
        assert plan is not None
        binary = router_binary()
        if not binary:
            self._failed = (
                "vllm-router is not installed: pip install 'step-station[fleet]' "
                "(or pip install vllm-router) in the appliance's environment."
            )
            self._view = FleetView(router="failed", policy=plan.policy, message=self._failed)
            log.error("fleet: %s", self._failed)
            return
        port = plan.port or _free_port()
        metrics_port = _free_port()
        argv = router_argv(binary, port, metrics_port, plan.workers, plan.policy)
        st.private_dir(self.log_path.parent)
        with open(self.log_path, "ab") as out:
            out.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(argv)}\n".encode())
            out.flush()
            process = subprocess.Popen(  # noqa: S603 - our own argv, no shell
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        self._run = _Run(plan, process, port, metrics_port)
        with contextlib.suppress(OSError, psutil.Error):
            started = psutil.Process(process.pid).create_time()
            st.write_private(self.pid_path, json.dumps({"pid": process.pid, "started": started}))
        self._view = FleetView(router="starting", policy=plan.policy, members=self._starting())
        log.info("fleet: vllm-router on %s:%d (pid %d)", LOOPBACK, port, process.pid)

    def _starting(self) -> tuple[MemberView, ...]:
        plan = self._plan
        return tuple(MemberView(m.name, m.url, "starting") for m in plan.members) if plan else ()

    def _stop_run(self) -> None:
        run, self._run = self._run, None
        self._route = None
        if run is None:
            return
        with contextlib.suppress(OSError):
            self.pid_path.unlink()
        with contextlib.suppress(ProcessLookupError):
            run.process.terminate()
        try:
            run.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            run.process.kill()
            run.process.wait(timeout=5)

    def _supervise(self) -> None:
        while not self._stop.wait(POLL_S):
            try:
                self._tick()
                self._publish()
            except Exception:  # noqa: BLE001 - the supervisor must outlive one bad poll
                log.exception("fleet: poll failed")

    def _tick(self) -> None:
        with self._lock:
            run, plan = self._run, self._plan
            if plan is None or run is None:
                return
            code = run.process.poll()
            if code is not None:
                self._route = None
                now = time.monotonic()
                while self._restarts and now - self._restarts[0] > RESTART_WINDOW_S:
                    self._restarts.popleft()
                if len(self._restarts) >= MAX_RESTARTS:
                    self._failed = (
                        f"vllm-router exited (code {code}) {MAX_RESTARTS} times in "
                        f"{RESTART_WINDOW_S / 60:.0f} min; see {self.log_path}. Requests go to "
                        "this Station's own engine."
                    )
                    self._view = FleetView("failed", plan.policy, self._starting(), self._failed)
                    self._run = None
                    return
                self._restarts.append(now)
                log.warning("fleet: vllm-router exited (code %s); restarting", code)
                self._start_run()
                return
        view, route = self._poll(run)
        with self._lock:
            if self._run is run:
                self._view, self._route = view, route

    def _poll(self, run: _Run) -> tuple[FleetView, tuple[str, str] | None]:
        plan = run.plan
        base = f"http://{LOOPBACK}:{run.port}"
        try:
            with urllib.request.urlopen(f"{base}/workers", timeout=2) as response:  # noqa: S310
                workers = json.loads(response.read())["workers"]
        except (OSError, ValueError, KeyError):
            state = "starting" if time.monotonic() - run.started < READY_TIMEOUT_S else "failed"
            message = f"vllm-router does not answer; see {self.log_path}"
            message = "" if state == "starting" else message
            return FleetView(state, plan.policy, self._starting(), message), None
        metrics = self._metrics(run)
        by_url = {str(w.get("url", "")).rstrip("/"): w for w in workers}
        if set(by_url) != set(plan.workers):
            # Somebody changed the router's workers (its admin routes answer any local account):
            # the fleet key must not go to a worker we did not name. Restart it as configured.
            log.error("fleet: the router's workers %s are not the configured ones", sorted(by_url))
            run.process.kill()
            changed = "the router's worker list changed"
            return FleetView("restarting", plan.policy, self._starting(), changed), None
        members = []
        for member in plan.members:
            worker = by_url[member.url]
            # vllm_router_cb_state: 0 closed, 1 open, 2 half-open (trial requests let through)
            circuit = metrics.get(("vllm_router_cb_state", member.url), 0.0)
            if not worker.get("is_healthy"):
                state = "failed"
            else:  # answering health checks; its breaker still open after failed requests
                state = "recovering" if circuit in (1, 2) else "healthy"
            report = self._member_report(member, state == "healthy")
            members.append(
                MemberView(
                    member.name,
                    member.url,
                    state,
                    int(worker.get("load") or 0),
                    int(metrics.get(("vllm_router_processed_requests_total", member.url), 0)),
                    _opt_int(report.get("running")),
                    _opt_int(report.get("waiting")),
                    _opt_float(report.get("kv_cache_pct")),
                )
            )
        key = self.key.value()
        route = (base, key) if key else None
        return FleetView("running", plan.policy, tuple(members)), route

    def _member_report(self, member: Member, healthy: bool) -> dict[str, Any]:
        """The member's last load report, asked again every LOAD_EVERY_S while it is healthy."""
        if not healthy:
            self._reports.pop(member.url, None)
            return {}
        at, report = self._reports.get(member.url, (0.0, {}))
        now = time.monotonic()
        key = self.key.value()
        if now - at >= LOAD_EVERY_S and key:
            report = member_load(member.url, key)
            self._reports[member.url] = (now, report)
        return report

    def _metrics(self, run: _Run) -> dict[tuple[str, str], float]:
        found: dict[tuple[str, str], float] = {}
        try:
            url = f"http://{LOOPBACK}:{run.metrics_port}/metrics"
            with urllib.request.urlopen(url, timeout=2) as response:  # noqa: S310
                text = response.read().decode("utf-8", "replace")
        except OSError:
            return found
        for line in text.splitlines():
            match = _METRIC.match(line.strip())
            if match:
                found[(match.group(1), match.group(2).rstrip("/"))] = float(match.group(3))
        return found


def _opt_int(value: object) -> int | None:
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _opt_float(value: object) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None
