"""What the idle UI costs, and what polling Gradio's queue less often costs a click.

    .venv/bin/python benchmarks/ui_idle.py [--polls 0,5] [--window 20] [--rounds 3] [--calls 60]

Starts one `step-station up --demo` per poll interval (STEP_STATION_QUEUE_POLL_MS; Gradio's own
is 1 ms; 0, the default since issue 16, is no polling: the queue sleeps until an event comes,
ui/queue_wake.py), all at once, each in its own STEP_STATION_HOME on free ports, engines ready,
no page open. Then, side by side in one run (windows interleaved, so the machine's noise hits all
alike):
- idle CPU per second of the appliance process, and of its main thread (uvicorn + Gradio);
- the round trip of one small UI event (the history search, `/on_search`) through Gradio's
  queue (queue/join, then the event stream; the path a click takes): median and p90.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python benchmarks/<name>.py`

from benchmarks.common import launch_demo, ui_cookie, wait_demo_ready  # noqa: E402

TICKS = os.sysconf("SC_CLK_TCK")


def main_thread_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/task/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def idle_cpu(pid: int, window_s: float) -> tuple[float, float]:
    proc = psutil.Process(pid)
    t0 = time.monotonic()
    c0 = proc.cpu_times()
    m0 = main_thread_cpu_s(pid)
    time.sleep(window_s)
    c1 = proc.cpu_times()
    m1 = main_thread_cpu_s(pid)
    wall = time.monotonic() - t0
    process = (c1.user + c1.system - c0.user - c0.system) / wall
    return 1000 * process, 1000 * (m1 - m0) / wall


class SearchEvent:
    """The history search's event, sent as the page sends it: queue/join, then the SSE stream."""

    def __init__(self, url: str, home: Path) -> None:
        self.http = httpx.Client(base_url=url, timeout=30, headers=ui_cookie(home, url))
        dependency = next(
            d
            for d in self.http.get("config").json()["dependencies"]
            if d.get("api_name") in ("on_search", "list_update")  # the name before presets
        )
        self.fn_index = dependency["id"]
        self.trigger = dependency["targets"][0][0]
        # One session, as one open page has: Gradio builds a session's state on its first event
        # (~60 ms for this UI), which a page pays once, not per click.
        self.session = uuid.uuid4().hex

    def round_trip_ms(self) -> float:
        session = self.session
        t0 = time.perf_counter()
        self.http.post(
            "gradio_api/queue/join",
            json={
                "data": ["", None],
                "fn_index": self.fn_index,
                "session_hash": session,
                "event_data": None,
                "trigger_id": self.trigger,
            },
        ).raise_for_status()
        with self.http.stream(
            "GET", "gradio_api/queue/data", params={"session_hash": session}
        ) as s:
            for line in s.iter_lines():
                if (
                    line.startswith("data:")
                    and json.loads(line[5:]).get("msg") == "process_completed"
                ):
                    return 1000 * (time.perf_counter() - t0)
        raise SystemExit("the event's stream ended without process_completed")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--polls", default="0,5", help="poll intervals in ms, comma-separated (0: no polling)"
    )
    parser.add_argument("--window", type=float, default=20.0, help="seconds per CPU window")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--calls", type=int, default=60, help="events per poll and round")
    args = parser.parse_args()
    polls = [float(p) for p in args.polls.split(",")]

    with tempfile.TemporaryDirectory(prefix="ui-idle-") as tmp:
        running = []
        try:
            for poll in polls:
                home = Path(tmp) / f"poll-{poll:g}"
                # 0: the default since issue 16, the queue asleep until an event (ui/queue_wake.py)
                env = {"STEP_STATION_QUEUE_POLL_MS": str(poll)} if poll else {}
                running.append((poll, home, *launch_demo(home, env)))
            for _, home, proc, url in running:
                wait_demo_ready(proc, url, home)
            events = {poll: SearchEvent(url, home) for poll, home, _, url in running}
            time.sleep(5)  # start-up work settles
            cpu: dict[float, list[tuple[float, float]]] = {p: [] for p in polls}
            trips: dict[float, list[float]] = {p: [] for p in polls}
            for _ in range(args.rounds):
                for poll, _, proc, _ in running:
                    cpu[poll].append(idle_cpu(proc.pid, args.window))
                for poll in polls:
                    events[poll].round_trip_ms()  # the session's first event (not counted)
                    trips[poll] += [events[poll].round_trip_ms() for _ in range(args.calls)]
        finally:
            for _, _, proc, _ in running:
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGINT)
            for _, _, proc, _ in running:
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)

    base = polls[0]
    base_cpu = statistics.median(c[0] for c in cpu[base])
    base_trip = statistics.median(trips[base])
    print(f"cores: {os.cpu_count()}, load average {os.getloadavg()[0]:.1f}")
    print(
        "| queue poll (0: none) | appliance idle CPU | x poll "
        f"{base:g} ms | main thread | event round trip median | p90 | added vs {base:g} ms |"
    )
    print("|---|---|---|---|---|---|---|")
    for poll in polls:
        process = statistics.median(c[0] for c in cpu[poll])
        main_thread = statistics.median(c[1] for c in cpu[poll])
        median = statistics.median(trips[poll])
        p90 = statistics.quantiles(trips[poll], n=10)[-1]
        print(
            f"| {poll:g} ms | {process:.1f} ms/s | {process / base_cpu:.2f}x | "
            f"{main_thread:.1f} ms/s | {median:.1f} ms | {p90:.1f} ms | "
            f"{median - base_trip:+.1f} ms |"
        )


if __name__ == "__main__":
    main()
