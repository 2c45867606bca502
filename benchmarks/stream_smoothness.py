"""Streaming smoothness in a real browser: our chat tab vs a naive Gradio ChatInterface.

Both stream the same answer (default 4,000 tokens at 350 tokens/s, reasoning level low) from the
same simulator engine, in the same run, in headless Chromium. For each:

- lag ratio = (time the last token is visible in the page) / (time the engine finished), both
  measured from the moment Enter was pressed; lag = the difference, in seconds;
- UI updates = DOM mutation batches the chat received;
- appliance CPU = CPU seconds of the UI server process from Enter to the page settling;
- responsiveness = how late a 50 ms page timer fired while streaming (p95 / max), and the
  total of the page's long tasks (> 50 ms) while streaming.

    .venv/bin/python benchmarks/stream_smoothness.py [--tokens 4000] [--rate 350] [--runs 2]

The naive app is `gr.ChatInterface` with one `yield` per streamed delta (what most Gradio chat
demos do); this script serves it itself (`--serve-naive`). Results go to stdout and, with
`--json PATH`, to a file. Numbers depend on the machine: compare the two columns, not runs.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python benchmarks/<name>.py`

from benchmarks.common import CHROMIUM_ARGS, free_port, give_ui_secret, up_demo_argv  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PROMPT = "Write a long, detailed answer about streaming."
LEVEL = "low"

PROBE = """(sel) => {
  const el = document.querySelector(sel);
  const now = () => performance.timeOrigin + performance.now();
  const p = {muts: [], lags: [], longtasks: [], last: now()};
  window.__probe = p;
  new MutationObserver(() => {
    const t = now();
    p.muts.push([t, el.textContent.length]);
    p.last = t;
  }).observe(el, {childList: true, subtree: true, characterData: true});
  let expected = performance.now() + 50;
  setInterval(() => {
    const n = performance.now();
    p.lags.push([performance.timeOrigin + n, Math.max(0, n - expected)]);
    expected = n + 50;
  }, 50);
  new PerformanceObserver((list) => {
    for (const e of list.getEntries()) {
      p.longtasks.push([performance.timeOrigin + e.startTime, e.duration]);
    }
  }).observe({type: 'longtask', buffered: false});
  return now();
}"""


def wait_http(
    url: str,
    timeout_s: float,
    proc: subprocess.Popen[bytes],
    check: Callable[[bytes], bool] | None = None,
) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{proc.args!r} exited with {proc.returncode}")  # a list: as str()
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                body = response.read()
                if check is None or check(body):
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"{url} not ready after {timeout_s} s")


def norm(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


# --------------------------------------------------------------------------------- naive app


def engine_of_home() -> tuple[str, str]:
    """The demo engine's URL (its private socket) and its per-start key, from STEP_STATION_HOME:
    what the appliance's own chat uses."""
    from appliance import endpoint
    from appliance import settings as st
    from appliance.engine import engine_key

    settings = st.load_settings().settings
    name = settings.engine.container_name
    keys = sorted(
        (engine_key.keys_root() / name).glob(f"*/{engine_key.KEY_FILE}"),
        key=lambda p: p.stat().st_mtime,
    )
    key = keys[-1].read_text().strip() if keys else ""
    return endpoint.engine_url(settings.engine), key


def serve_naive(port: int, record: Path) -> None:
    """A plain ChatInterface: one yield per streamed delta (reasoning, then answer), straight to
    the demo engine on its socket."""
    import gradio as gr

    from appliance import endpoint

    engine, key = engine_of_home()
    http = endpoint.client(engine, timeout=None, headers={"Authorization": f"Bearer {key}"})

    def respond(message: str, history: list[Any]) -> Any:
        del history
        text = ""
        body = {
            "model": "step3p7-flash",
            "messages": [{"role": "user", "content": message}],
            "stream": True,
            "reasoning_effort": LEVEL,
        }
        with http.stream("POST", "/v1/chat/completions", json=body) as r:
            for line in r.iter_lines():
                if not line.startswith("data:"):
                    continue
                payload = line[5:].strip()
                if payload == "[DONE]":
                    break
                for choice in json.loads(payload).get("choices") or []:
                    delta = choice.get("delta") or {}
                    piece = (delta.get("reasoning") or delta.get("reasoning_content") or "") + (
                        delta.get("content") or ""
                    )
                    if piece:
                        text += piece
                        yield text
        finished = time.time()
        with record.open("a") as handle:
            handle.write(json.dumps({"finished_wall": finished, "text": text}) + "\n")

    demo = gr.ChatInterface(respond, chatbot=gr.Chatbot(elem_id="chatbot"))
    demo.launch(server_name="127.0.0.1", server_port=port, ssr_mode=False, quiet=True)


# ------------------------------------------------------------------------------- measuring


class Target:
    name: str
    input = "textarea"
    url: str
    proc: subprocess.Popen[bytes]

    def prepare(self, page: Any) -> None: ...

    def finished(self, count: int) -> tuple[float, str] | None:
        """(engine finished wall time, final answer text) of reply number `count`, if done."""
        raise NotImplementedError


class Ours(Target):
    name = "Step Station chat"
    input = "#chat-input textarea"

    def __init__(self, proc: subprocess.Popen[bytes], url: str, home: Path) -> None:
        self.proc, self.url, self.db = proc, url, home / "data" / "history.sqlite3"

    def prepare(self, page: Any) -> None:
        # after the page load's answer (its preset and level), which would set a level back
        page.wait_for_function("() => document.body.dataset.chatLoaded === '1'")
        page.locator("#reasoning-level").get_by_label(LEVEL, exact=True).check()

    def finished(self, count: int) -> tuple[float, str] | None:
        if not self.db.exists():
            return None
        db = sqlite3.connect(self.db)
        try:
            rows = db.execute(
                "SELECT status, meta, content FROM messages WHERE role = 'assistant' "
                "ORDER BY created_at"
            ).fetchall()
        finally:
            db.close()
        if len(rows) < count or rows[count - 1][0] != "complete":
            return None
        meta = json.loads(rows[count - 1][1])
        return float(meta["finished_wall"]), rows[count - 1][2]


class Naive(Target):
    name = "naive ChatInterface"

    def __init__(self, proc: subprocess.Popen[bytes], url: str, record: Path) -> None:
        self.proc, self.url, self.record = proc, url, record

    def finished(self, count: int) -> tuple[float, str] | None:
        if not self.record.exists():
            return None
        lines = self.record.read_text().splitlines()
        if len(lines) < count:
            return None
        data = json.loads(lines[count - 1])
        return float(data["finished_wall"]), data["text"]


def measure(browser: Any, target: Target, count: int) -> dict[str, Any]:
    import psutil

    context = browser.new_context(viewport={"width": 1440, "height": 1000})
    page = context.new_page()
    for _ in range(3):  # Docker's veth churn can abort the first load (ERR_NETWORK_CHANGED)
        page.goto(target.url)
        try:
            page.wait_for_selector("#chatbot", timeout=20_000)
            page.wait_for_selector(target.input, timeout=20_000)
            break
        except Exception:  # noqa: S112 - reload and try again
            continue
    target.prepare(page)
    page.evaluate(PROBE, "#chatbot")
    server = psutil.Process(target.proc.pid)
    cpu0 = sum(server.cpu_times()[:2])
    textarea = page.locator(target.input).first
    textarea.fill(PROMPT)
    sent = page.evaluate("() => performance.timeOrigin + performance.now()") / 1000
    textarea.press("Enter")
    deadline = time.monotonic() + 300
    done = None
    while done is None:
        if time.monotonic() > deadline:
            raise SystemExit(f"{target.name}: no finished reply after 300 s")
        time.sleep(0.2)
        done = target.finished(count)
    finished_wall, answer = done
    # The page has settled when nothing changed for 2 s.
    while True:
        last = page.evaluate("() => window.__probe.last") / 1000
        if time.time() - last > 2.0:
            break
        time.sleep(0.25)
    cpu = sum(server.cpu_times()[:2]) - cpu0
    probe = page.evaluate("() => window.__probe")
    final_text = page.locator("#chatbot").inner_text()
    context.close()

    if norm(answer)[-80:] not in norm(final_text):
        raise SystemExit(f"{target.name}: the final answer is not in the page")
    # The last token became visible at the last change of the chat's text length (the page
    # settled after it; later mutations, such as buttons appearing, add no text).
    visible, previous = None, None
    for t, length in probe["muts"]:
        if length != previous:
            visible, previous = t / 1000, length
    assert visible is not None
    lags = [lag for t, lag in probe["lags"] if sent <= t / 1000 <= visible]
    long_ms = sum(d for t, d in probe["longtasks"] if sent <= t / 1000 <= visible)
    return {
        "engine_s": finished_wall - sent,
        "visible_s": visible - sent,
        "ratio": (visible - sent) / (finished_wall - sent),
        "behind_s": visible - finished_wall,
        "updates": sum(1 for t, _ in probe["muts"] if sent <= t / 1000 <= visible),
        "cpu_s": cpu,
        "timer_lag_p95_ms": statistics.quantiles(lags, n=20)[-1] if len(lags) > 1 else None,
        "timer_lag_max_ms": max(lags) if lags else None,
        "long_tasks_ms": long_ms,
    }


def start_targets(args: argparse.Namespace, work: Path) -> tuple[Ours, Naive]:
    home = work / "home"
    (home / "config").mkdir(parents=True)
    ui_port, api_port, naive_port = (free_port() for _ in range(3))
    settings = ""
    if args.interval_ms is not None:
        settings += f"[chat]\nstream_interval_ms = {args.interval_ms}\n"
    (home / "config" / "settings.toml").write_text(settings)
    token = give_ui_secret(home)
    env = {
        **os.environ,
        "STEP_STATION_HOME": str(home),
        "GRADIO_ANALYTICS_ENABLED": "False",
        "STEP_SIM_LOAD_S": "0.5",
        "STEP_SIM_TTFT_MS": "100",
        "STEP_SIM_TOKENS_PER_S": str(args.rate),
        "STEP_SIM_OUTPUT_TOKENS": str(args.tokens),
    }
    log = (work / "appliance.log").open("wb")
    appliance = subprocess.Popen(
        up_demo_argv(ui_port, api_port),
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    ui = f"http://127.0.0.1:{ui_port}/"
    wait_http(ui + "healthz", 120, appliance, lambda body: b'"ready"' in body)
    record = work / "naive.jsonl"
    naive = subprocess.Popen(
        [sys.executable, __file__, "--serve-naive", str(naive_port), "--record", str(record)],
        cwd=REPO,
        env=env,
        stdout=(work / "naive.log").open("wb"),
        stderr=subprocess.STDOUT,
    )
    naive_url = f"http://127.0.0.1:{naive_port}/"
    wait_http(naive_url, 120, naive)
    return Ours(appliance, f"{ui}?token={token}", home), Naive(naive, naive_url, record)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4000)
    parser.add_argument("--rate", type=float, default=350.0)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--json", type=Path)
    parser.add_argument(
        "--interval-ms", type=int, help="chat.stream_interval_ms for our side (default: setting)"
    )
    parser.add_argument("--only", choices=["ours", "naive"], help="measure one side only")
    parser.add_argument("--keep", action="store_true", help="keep the work dir (logs)")
    parser.add_argument("--serve-naive", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--record", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_naive:
        serve_naive(args.serve_naive, args.record)
        return 0

    from playwright.sync_api import sync_playwright

    tmp = tempfile.mkdtemp(prefix="stream-bench-")
    print(f"work dir: {tmp}", flush=True)
    try:
        ours, naive = start_targets(args, Path(tmp))
        results: dict[str, list[dict[str, Any]]] = {ours.name: [], naive.name: []}
        try:
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(
                    executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS, headless=True
                )
                for run in range(1, args.runs + 1):
                    for target in (ours, naive):  # alternate, so load drifts hit both
                        if args.only and target is not (ours if args.only == "ours" else naive):
                            continue
                        result = measure(browser, target, run)
                        results[target.name].append(result)
                        print(f"run {run} {target.name}: {json.dumps(result)}", flush=True)
                browser.close()
        finally:
            for target in (ours, naive):
                target.proc.terminate()
                try:
                    target.proc.wait(30)
                except subprocess.TimeoutExpired:
                    target.proc.kill()
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    report(results, args)
    if args.json:
        args.json.write_text(
            json.dumps(
                {"args": vars(args) | {"json": str(args.json)}, "results": results},
                indent=2,
                default=str,
            )
        )
    return 0


def report(results: dict[str, list[dict[str, Any]]], args: argparse.Namespace) -> None:
    names = list(results)
    rows = [
        ("engine finished after (s)", "engine_s", "{:.2f}"),
        ("last token visible after (s)", "visible_s", "{:.2f}"),
        ("visible / engine (ratio)", "ratio", "{:.3f}"),
        ("behind the engine (s)", "behind_s", "{:.2f}"),
        ("UI updates", "updates", "{:.0f}"),
        ("UI server CPU (s)", "cpu_s", "{:.2f}"),
        ("page timer lag p95 (ms)", "timer_lag_p95_ms", "{:.0f}"),
        ("page timer lag max (ms)", "timer_lag_max_ms", "{:.0f}"),
        ("page long tasks (ms)", "long_tasks_ms", "{:.0f}"),
    ]
    print()
    print(
        f"{args.tokens} tokens at {args.rate:g} tokens/s, level {LEVEL}, median of {args.runs} "
        "run(s), headless Chromium"
    )
    print(f"| metric | {' | '.join(names)} |")
    print(f"|---|{'---|' * len(names)}")
    for label, key, fmt in rows:
        cells = []
        for name in names:
            values = [r[key] for r in results[name] if r[key] is not None]
            cells.append(fmt.format(statistics.median(values)) if values else "n/a")
        print(f"| {label} | {' | '.join(cells)} |")


if __name__ == "__main__":
    raise SystemExit(main())
