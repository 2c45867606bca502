"""Chat streaming while the owner login is attacked: p95 gap between a chat's stream updates.

`step-station up --demo` with "UI on LAN" on (the UI on 127.0.0.2, an owner login set). The owner
signs in and sends a chat through Gradio's queue as the page does (queue/join, then the event
stream); each `process_generating` message is one stream update of the reply (tokens since the
previous one). The gaps between updates are measured three times in one run, side by side:

- quiet: nothing else happens;
- one address: 500 wrong logins from one address (127.0.<run>.3), 8 at a time (the throttle
  refuses most of them);
- many addresses: 500 wrong logins from 50 addresses (127.0.<run>.x), 10 each, 8 at a time:
  within the throttle's allowance, so every one of them runs the scrypt check.

    .venv/bin/python benchmarks/login_burst.py [--runs 2] [--tokens 3000] [--write]

Before the fix the check ran inline in the event loop (Gradio calls a plain `auth` from its async
/login route): run this script from a checkout of the older code to compare. `--write` puts the
table in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # for `python benchmarks/login_burst.py`

from appliance import settings as st  # noqa: E402
from appliance.keys import hash_login  # noqa: E402
from benchmarks.common import free_port, up_demo_argv, write_section  # noqa: E402

LAN = "127.0.0.2"
USER, PASSWORD = "owner", "station-pass-1"
BEGIN = "<!-- login_burst:begin -->"
END = "<!-- login_burst:end -->"


def start(home: Path, tokens_per_s: int, output_tokens: int) -> tuple[subprocess.Popen[bytes], str]:
    ui_port, api_port, engine_port = free_port(), free_port(), free_port()
    (home / "config").mkdir(parents=True)
    (home / "config" / "settings.toml").write_text(
        f'[engine]\nport = {engine_port}\n[ui]\nlan = true\nhost = "{LAN}"\n'
    )
    st.save_secrets(
        st.Secrets(ui_login_hash=hash_login(USER, PASSWORD)), home / "config" / "secrets.toml"
    )
    proc = subprocess.Popen(
        up_demo_argv(ui_port, api_port),
        cwd=REPO,
        env={
            **os.environ,
            "STEP_STATION_HOME": str(home),
            "GRADIO_ANALYTICS_ENABLED": "False",
            "STEP_SIM_LOAD_S": "0.5",
            "STEP_SIM_TTFT_MS": "20",
            "STEP_SIM_TOKENS_PER_S": str(tokens_per_s),
            "STEP_SIM_OUTPUT_TOKENS": str(output_tokens),
        },
        stdout=(home / "up.log").open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://{LAN}:{ui_port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            health = httpx.get(url + "/healthz", timeout=2).json()
            if health.get("engine") == "ready":
                return proc, url
        except (httpx.HTTPError, ValueError):
            pass
        if proc.poll() is not None:
            raise SystemExit((home / "up.log").read_text()[-2000:])
        time.sleep(0.3)
    raise SystemExit("appliance not ready in 120 s")


class Chat:
    """The owner's page: signed in, sends a chat through the queue as the page does."""

    def __init__(self, url: str) -> None:
        self.http = httpx.Client(base_url=url, timeout=120, headers={"Origin": url})
        answer = self.http.post("/login", data={"username": USER, "password": PASSWORD})
        answer.raise_for_status()
        deps = self.http.get("/config").json()["dependencies"]
        self.deps = {d.get("api_name"): d for d in deps}

    def _join(self, name: str, data: list[Any], session: str) -> None:
        dep = self.deps[name]
        self.http.post(
            "/gradio_api/queue/join",
            json={
                "data": data,
                "fn_index": dep["id"],
                "session_hash": session,
                "event_data": None,
                "trigger_id": dep["targets"][0][0] if dep["targets"] else None,
            },
        ).raise_for_status()

    def _events(self, session: str) -> list[tuple[float, dict[str, Any]]]:
        seen = []
        with self.http.stream(
            "GET", "/gradio_api/queue/data", params={"session_hash": session}
        ) as stream:
            for line in stream.iter_lines():
                if line.startswith("data:"):
                    message = json.loads(line[5:])
                    seen.append((time.perf_counter(), message))
                    if message.get("msg") == "process_completed":
                        return seen
        raise SystemExit(f"no process_completed: {seen[-3:]}")

    def stream_gaps_ms(self, prompt: str) -> list[float]:
        session = uuid.uuid4().hex
        sampling = ["low", "", 0.7, 0.95, 0]
        self._join("on_submit", [{"text": prompt, "files": []}, "", *sampling], session)
        done = self._events(session)[-1][1]
        conversation = done["output"]["data"][0]
        self._join("on_respond", [conversation, *sampling], session)
        times = [t for t, m in self._events(session) if m.get("msg") == "process_generating"]
        return [1000 * (b - a) for a, b in itertools.pairwise(times)]


def burst(url: str, sources: list[str], per_source: int) -> dict[str, int]:
    counts: dict[str, int] = {}
    lock = threading.Lock()
    clients = {
        s: httpx.Client(
            base_url=url,
            transport=httpx.HTTPTransport(local_address=s),
            timeout=120,
            headers={"Origin": url},
        )
        for s in sources
    }

    def one(i: int) -> None:
        client = clients[sources[i % len(sources)]]
        try:
            code = str(
                client.post("/login", data={"username": USER, "password": f"wrong-{i}"}).status_code
            )
        except httpx.HTTPError as err:
            code = type(err).__name__
        with lock:
            counts[code] = counts.get(code, 0) + 1

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(one, range(len(sources) * per_source)))
    return counts


def p95(values: list[float]) -> float:
    return (
        statistics.quantiles(values, n=20, method="inclusive")[-1]
        if len(values) > 1
        else float("nan")
    )


def measure(chat: Chat, url: str, scenario: str, run: int) -> dict[str, Any]:
    prompt = "Write a long answer about streaming."  # its length: STEP_SIM_OUTPUT_TOKENS
    # New addresses every run: the throttle still remembers the last run's.
    sources = {
        "one address": [f"127.0.{run + 1}.3"],
        "many addresses": [f"127.0.{run + 1}.{10 + i}" for i in range(50)],
    }
    if scenario == "quiet":
        return {"gaps": chat.stream_gaps_ms(prompt), "logins": {}}
    result: dict[str, Any] = {}
    worker = threading.Thread(
        target=lambda: result.update(
            logins=burst(url, sources[scenario], 500 // len(sources[scenario]))
        )
    )
    worker.start()
    result["gaps"] = chat.stream_gaps_ms(prompt)
    worker.join()
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--rate", type=int, default=400, help="simulated tokens per second")
    parser.add_argument("--tokens", type=int, default=3000)
    parser.add_argument("--write", action="store_true", help="update docs/benchmarks.md")
    parser.add_argument("--label", default="", help="a name for this code in the table")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="login-burst-") as tmp:
        proc, url = start(Path(tmp) / "home", args.rate, args.tokens)
        try:
            chat = Chat(url)
            rows = []
            for run in range(args.runs):
                for scenario in ("quiet", "one address", "many addresses"):
                    got = measure(chat, url, scenario, run)
                    gaps = got["gaps"]
                    row = {
                        "run": run + 1,
                        "scenario": scenario,
                        "updates": len(gaps) + 1,
                        "median_ms": statistics.median(gaps),
                        "p95_ms": p95(gaps),
                        "max_ms": max(gaps),
                        "logins": got["logins"],
                    }
                    rows.append(row)
                    print(json.dumps(row), flush=True)
        finally:
            proc.terminate()
            proc.wait(20)
    quiet = statistics.median(r["p95_ms"] for r in rows if r["scenario"] == "quiet")
    lines = [
        "| run | while | stream updates | median gap | p95 gap | p95 / quiet | max gap | logins |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        logins = ", ".join(f"{k}: {v}" for k, v in sorted(r["logins"].items())) or "none"
        lines.append(
            f"| {r['run']} | {r['scenario']} | {r['updates']} | {r['median_ms']:.1f} ms | "
            f"{r['p95_ms']:.1f} ms | {r['p95_ms'] / quiet:.2f}x | {r['max_ms']:.0f} ms | {logins} |"
        )
    table = "\n".join(lines)
    print(table)
    if args.write:
        write_section(
            BEGIN,
            END,
            f"{BEGIN}\n## Chat streaming during a login burst (`benchmarks/login_burst.py`)\n\n"
            f"{args.label or 'This code'}; {args.tokens} tokens at {args.rate} tokens/s, "
            f"{os.cpu_count()} cores, shared with other work.\n\n{table}\n{END}",
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
