"""Capture real vLLM logs into this folder (by hand, not a test: each case starts a real engine).

    .venv/bin/python tests/data/vllm_logs/capture.py [CASE ...]   # cases: see CASES below

Uses the real engine of scripts/realvllm.sh (tests/fixtures/realvllm.py's argv and environment),
one engine at a time. The files are kept whole: the log of the process (stdout and stderr, as
`docker logs` shows it), nothing stripped.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
sys.path.insert(0, str(REPO / "tests"))

from fixtures import realvllm  # noqa: E402
from fixtures.sim import free_port  # noqa: E402


def argv(model: str, port: int, *flags: str) -> list[str]:
    path = os.environ.get("CAPTURE_MODEL_PATH") or str(realvllm.MODELS[model])
    return [
        str(realvllm.VENV / "bin" / "vllm"), "serve", path,
        "--host", "127.0.0.1", "--port", str(port),
        *realvllm.COMMON_FLAGS, *realvllm.MODEL_FLAGS[model], *flags,
    ]  # fmt: skip


def children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry.name))
    return out


def comm(pid: int) -> str:
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def wait_ready(proc: subprocess.Popen[bytes], url: str, timeout: float = 1500) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if realvllm.http_status(f"{url}/health") == 200:
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.5)
    return False


def run(name: str, model: str, flags: tuple[str, ...], env: dict[str, str], action: str) -> None:
    port = free_port()
    out = HERE / name
    partial = out.with_name(name + ".partial")  # *.log only once complete (the tests read *.log)
    with partial.open("wb") as log:
        proc = subprocess.Popen(  # noqa: S603
            argv(model, port, *flags),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={k: v for k, v in realvllm.engine_env(env).items() if v},
            start_new_session=True,
        )
        try:
            if action == "exit":
                proc.wait(400)
            else:
                ok = wait_ready(proc, f"http://127.0.0.1:{port}")
                print(name, "ready" if ok else f"not ready ({proc.poll()})")
                if action == "sigterm":
                    os.killpg(proc.pid, signal.SIGTERM)
                elif action == "kill-core":
                    cores = [c for c in children(proc.pid) if "EngineCore" in comm(c)]
                    print(name, "engine core", cores, [comm(c) for c in children(proc.pid)])
                    for c in cores:
                        os.kill(c, signal.SIGKILL)
                proc.wait(120)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(30)
            with contextlib.suppress(ProcessLookupError):  # an engine core left behind
                os.killpg(proc.pid, signal.SIGKILL)
    partial.replace(out)
    print(name, "exit", proc.returncode, out.stat().st_size, "bytes")


LOGO_OFF = {"VLLM_DISABLE_LOG_LOGO": "1"}
# This machine's CPU (AMD EPYC without AVX-512) refuses the fixture's --kv-cache-dtype fp8
# (cpu-0.32-std-fp8-kv-cache-refused.log); the later flag wins in vLLM's argparse.
AUTO_KV = ("--kv-cache-dtype", "auto")
CASES = {
    "std-start-logo-sigterm": (
        "cpu-0.32-std-start-logo-sigterm.log", "std", AUTO_KV, {}, "sigterm"),
    "std-start-nologo-core-killed": (
        "cpu-0.32-std-start-nologo-enginecore-killed.log", "std", AUTO_KV, LOGO_OFF, "kill-core"),
    "step-start-nologo-sigterm": (
        "cpu-0.32-step-start-nologo-sigterm.log", "step", AUTO_KV, LOGO_OFF, "sigterm"),
    "std-fp8-kv-refused": ("cpu-0.32-std-fp8-kv-cache-refused.log", "std", (), {}, "exit"),
    "memory-refused": (
        "cpu-0.32-std-memory-refused.log", "std", ("--gpu-memory-utilization", "0.99"),
        {"VLLM_CPU_KVCACHE_SPACE": ""}, "exit"),
    "unknown-flag": ("cpu-0.32-unknown-flag.log", "std", ("--no-such-flag",), {}, "exit"),
    "sleep-mode-refused": (
        "cpu-0.32-sleep-mode-refused.log", "std", ("--enable-sleep-mode",), {}, "exit"),
}  # fmt: skip

if __name__ == "__main__":
    slot = realvllm.take_slot()
    for case in sys.argv[1:] or list(CASES):
        run(*CASES[case])
