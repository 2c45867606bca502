"""`vllm bench serve` of the real (CPU) vLLM, driven by the appliance's pieces: the argv from
appliance.bench.presets, progress from its stderr, the result file through appliance.bench.result,
kept in the store; and vLLM's own config-file naming against appliance.bench.tune."""

from __future__ import annotations

import json
import os
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest
from fixtures.realvllm import MODELS, SERVED, VENV, engine_env, require_real_vllm

from appliance.bench import presets, tune
from appliance.bench.progress import ProgressReader
from appliance.bench.result import load_result
from appliance.bench.store import BenchStore, RunInfo, export_json

pytestmark = pytest.mark.timeout(900)

BENCH_TIMEOUT_S = 300.0


def test_seed_preset_scaled_down_runs_against_the_real_engine(
    real_vllm_std: Any, tmp_path: Path
) -> None:
    exe = require_real_vllm()
    args = presets.bench_args(
        "seed",
        model=str(MODELS["std"]),
        served_model_name=SERVED,
        base_url=real_vllm_std.url,
        tokenizer=str(MODELS["std"]),
        context_len=4096,  # the fixture's --max-model-len
        num_prompts=5,
        random_input=32,
        random_output=16,
        result_dir=str(tmp_path / "results"),
        result_filename="run.json",
    )
    env = engine_env(presets.bench_env())
    stdout = (tmp_path / "bench.out").open("wb")
    proc = subprocess.Popen(  # noqa: S603
        [str(exe), "bench", "serve", *args],
        stdout=stdout,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        env=env,
        cwd=tmp_path,
    )
    reader = ProgressReader()
    stderr = bytearray()

    def pump() -> None:
        assert proc.stderr is not None
        while chunk := os.read(proc.stderr.fileno(), 4096):
            stderr.extend(chunk)
            reader.feed(chunk)

    thread = threading.Thread(target=pump, daemon=True)
    thread.start()
    try:
        rc = proc.wait(BENCH_TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        stdout.close()
    thread.join(10)
    output = (tmp_path / "bench.out").read_text(errors="replace")
    assert rc == 0, (
        f"bench exited {rc}:\n{output[-3000:]}\n{stderr.decode(errors='replace')[-3000:]}"
    )

    result = load_result(tmp_path / "results" / "run.json").require_success()
    assert result.completed == 5
    assert result.failed == 0
    assert result.raw["max_concurrency"] == 5  # the seed's 10, capped at the 5 prompts
    # `random` sets ignore_eos: every request generates exactly --random-output-len tokens.
    assert result.raw["total_output_tokens"] == 5 * 16
    assert result.ttft is not None
    assert result.ttft.mean > 0
    assert result.output_throughput > 0
    assert "p90_ttft_ms" in result.raw  # our --metric-percentiles took effect
    # The progress bar on stderr ended at all prompts done.
    assert reader.latest is not None
    assert (reader.latest.done, reader.latest.total) == (5, 5)

    with BenchStore() as store:
        run_id = store.add(
            RunInfo(profile="test", preset="seed", args=args, vllm_version="0.32.0"), result.raw
        )
        (exported,) = json.loads(export_json(store.list_runs()))
    assert exported["id"] == run_id
    assert exported["completed"] == 5


def test_config_file_names_match_vllms_own_function() -> None:
    """vLLM's get_config_file_name, run in the real vLLM with the GPU name swapped in (its
    device lookup is the one seam that needs a GPU), gives the names tune builds."""
    require_real_vllm()
    cases = [
        ("NVIDIA GB300", 288, 1280, "fp8_w8a8", [128, 128]),
        ("NVIDIA H200 NVL", 8, 7168, None, None),
        ("NVIDIA H100 80GB HBM3", 8, 14336, "fp8_w8a8", None),
        ("AMD Instinct MI300X / OAM", 64, 1024, "int8_w8a16", [0, 128]),
    ]
    script = (
        "import json, sys\n"
        "from vllm.platforms import current_platform\n"
        "from vllm.utils import platform_utils\n"
        "from vllm.model_executor.layers.fused_moe.fused_moe import get_config_file_name\n"
        "names = []\n"
        "for gpu, E, N, dtype, block in json.loads(sys.argv[1]):\n"
        "    current_platform.get_device_name = lambda device_id=0, g=gpu: g\n"
        "    platform_utils.get_device_name_as_file_name.cache_clear()\n"
        "    names.append(get_config_file_name(E, N, dtype, block))\n"
        "print(json.dumps(names))\n"
    )
    out = subprocess.run(  # noqa: S603
        [str(VENV / "bin" / "python"), "-c", script, json.dumps(cases)],
        capture_output=True,
        text=True,
        timeout=120,
        env=engine_env(),
        check=True,
    )
    theirs = json.loads(out.stdout.strip().splitlines()[-1])
    ours = [
        tune.config_file_name(
            tune.MoeShape(E, N, dtype, tuple(block) if block else None),  # type: ignore[arg-type]
            gpu,
        )
        for gpu, E, N, dtype, block in cases
    ]
    assert ours == theirs


def test_every_triton_config_shipped_with_vllm_reads_and_round_trips() -> None:
    """The 0.32 wheel's own tuned configs: each name `get_moe_configs` can look for parses back to
    itself, and each such file passes tune's format check (the `backend=flydsl` files are another
    kernel's format that vLLM's Triton lookup never names)."""
    require_real_vllm()
    (folder,) = VENV.glob("lib/python3*/site-packages/vllm/model_executor/layers/fused_moe/configs")
    files = tune.read_folder(folder)
    triton = [f for f in files if "backend=" not in f.path.name]
    assert len(triton) > 300
    for file in triton:
        assert file.usable, (file.path.name, file.problems)
        assert file.shape is not None
        assert tune.config_file_name(file.shape, file.device) == file.path.name
    assert all(f.shape is None for f in files if "backend=" in f.path.name)


def test_tuner_model_config_loads_in_vllm_with_step37s_shape(tmp_path: Path) -> None:
    """vLLM's `get_config` (what the tuner calls) reads the synthetic config to the numbers the
    tuner's Qwen3Moe branch uses, and its block shape."""
    require_real_vllm()
    text = {"moe_num_experts": 288, "moe_top_k": 8, "moe_intermediate_size": 1280}
    config = tune.tuner_model_config(text | {"hidden_size": 4096})
    (tmp_path / "config.json").write_text(json.dumps(config))
    script = (
        "import json, sys\n"
        "from vllm.transformers_utils.config import get_config\n"
        "c = get_config(sys.argv[1], trust_remote_code=False)\n"
        "print(json.dumps([c.architectures[0], c.num_experts, c.num_experts_per_tok,\n"
        "    c.moe_intermediate_size, c.hidden_size,\n"
        "    c.quantization_config['weight_block_size']]))\n"
    )
    out = subprocess.run(  # noqa: S603
        [str(VENV / "bin" / "python"), "-c", script, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        env=engine_env(),
        check=True,
    )
    loaded = json.loads(out.stdout.strip().splitlines()[-1])
    assert loaded == ["Qwen3MoeForCausalLM", 288, 8, 1280, 4096, [128, 128]]
