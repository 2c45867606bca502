"""What the benchmark scripts share: the repo root, Chromium's quiet launch flags, a free port,
and `step-station up --demo` started in its own home on free ports."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def give_ui_secret(home: Path) -> str:
    """Write the per-install UI secret before the appliance starts (it reads config/ui-token)."""
    token = secrets.token_urlsafe(32)
    (home / "config").mkdir(parents=True, exist_ok=True)
    (home / "config" / "ui-token").write_text(token + "\n")
    (home / "config" / "ui-token").chmod(0o600)
    return token


def ui_cookie(home: Path, url: str) -> dict[str, str]:
    """The Cookie header a browser holds after `step-station open` (appliance/web_guard.py)."""
    token = (home / "config" / "ui-token").read_text().strip()
    port = url.rstrip("/").rsplit(":", 1)[1]
    value = hmac.new(token.encode(), b"step-station ui cookie", hashlib.sha256).hexdigest()
    return {"Cookie": f"step-station-ui-{port}={value}"}


def open_url(home: Path, url: str) -> str:
    """What `step-station open` opens: the UI's address with its secret."""
    return f"{url}?token={(home / 'config' / 'ui-token').read_text().strip()}"


def up_demo_argv(ui_port: int, api_port: int) -> list[str]:
    """`step-station up --demo` on the given ports, as the benchmarks start it."""
    ports = ["--ui-port", str(ui_port), "--api-port", str(api_port)]
    return [sys.executable, "-m", "appliance", "up", "--demo", "--no-browser", *ports]


def launch_demo(home: Path, env: dict[str, str]) -> tuple[subprocess.Popen[bytes], str]:
    """Start `step-station up --demo` with STEP_STATION_HOME=home (its log: home/up.log)."""
    ui_port, api_port, engine_port = free_port(), free_port(), free_port()
    (home / "config").mkdir(parents=True)
    (home / "config" / "settings.toml").write_text(f"[engine]\nport = {engine_port}\n")
    give_ui_secret(home)
    proc = subprocess.Popen(
        up_demo_argv(ui_port, api_port),
        cwd=REPO,
        env={
            **os.environ,
            "STEP_STATION_HOME": str(home),
            "GRADIO_ANALYTICS_ENABLED": "False",
            "STEP_SIM_LOAD_S": "1",
            **env,
        },
        stdout=(home / "up.log").open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    return proc, f"http://127.0.0.1:{ui_port}/"


def wait_demo_ready(proc: subprocess.Popen[bytes], url: str, home: Path) -> None:
    """Until /healthz says the engine is ready; exit with the log if the appliance died."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url + "healthz", timeout=2) as response:
                if json.loads(response.read()).get("engine") == "ready":
                    return
        except OSError:
            pass
        if proc.poll() is not None:
            raise SystemExit(f"appliance exited: {(home / 'up.log').read_text()[-2000:]}")
        time.sleep(0.3)
    raise SystemExit("appliance not ready in 120 s")


def write_section(begin: str, end: str, text: str) -> None:
    """Replace the section between the markers in docs/benchmarks.md (or append it)."""
    path = REPO / "docs" / "benchmarks.md"
    current = path.read_text() if path.exists() else "# Benchmarks\n"
    if begin in current and end in current:
        head, rest = current.split(begin, 1)
        current = head + text + rest.split(end, 1)[1]
    else:
        current = current.rstrip("\n") + "\n\n" + text + "\n"
    path.write_text(current)
