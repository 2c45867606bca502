"""The argv of `vllm bench serve`: the seed's line token for token, then the appliance's extras."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from appliance.bench import presets
from appliance.errors import BadInputError

REPO = Path(__file__).resolve().parents[2]
BUNDLED_SEED = REPO / "tests" / "data" / "seed_model_card.txt"
SHARED_SEEDS = sorted((REPO.parent / "shared" / "seed").glob("*.txt"))

# The seed writes argparse prefixes; vLLM 0.32's parser (allow_abbrev stays True in
# FlexibleArgumentParser) expands them to these flags. Checked with the real parser in the
# issue 14 research note.
ABBREVIATIONS = {
    "--random-input": "--random-input-len",
    "--random-output": "--random-output-len",
    "--num-prompt": "--num-prompts",
}

COMMON = {
    "model": "stepfun-ai/Step-3.7-Flash",
    "served_model_name": "step3p7-flash",
    "base_url": "http://127.0.0.1:8000",
    "tokenizer": "/models/step",
    "result_dir": "/tmp/r",
    "result_filename": "run.json",
}


def seed_text() -> str:
    """The seed model card: ../shared/seed/*.txt when the checkout has it, else the copy."""
    if SHARED_SEEDS:
        return SHARED_SEEDS[0].read_text(encoding="utf-8")
    return BUNDLED_SEED.read_text(encoding="utf-8")


def seed_bench_line() -> list[str]:
    """The card's `vllm bench serve` command, continuation lines joined, split like a shell."""
    lines = seed_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("vllm bench serve"))
    joined = lines[start]
    i = start
    while joined.rstrip().endswith("\\"):
        i += 1
        joined = joined.rstrip()[:-1] + " " + lines[i]
    return shlex.split(joined)


def test_seed_preset_is_the_seed_line_token_for_token() -> None:
    seed = seed_bench_line()
    assert seed[:3] == list(presets.BENCH_COMMAND)
    expected = [ABBREVIATIONS.get(token, token) for token in seed[3:]]
    args = presets.bench_args("seed", context_len=262144, **COMMON)
    assert args[: len(expected)] == expected
    # What follows is only the appliance's extras, each for a reason given in bench_args:
    # the served name (the engine answers 404 to the checkpoint id), where the engine is (TCP),
    # the local tokenizer (bench tokenizes on the client), an explicit temperature and ready
    # check (defaults changed between vLLM versions), the percentiles, and the result file.
    assert args[len(expected) :] == [
        "--served-model-name", "step3p7-flash",
        "--base-url", "http://127.0.0.1:8000",
        "--tokenizer", "/models/step",
        "--temperature", "0",
        "--ready-check-timeout-sec", "0",
        "--percentile-metrics", "ttft,tpot,itl,e2el",
        "--metric-percentiles", "90,99",
        "--save-result",
        "--result-dir", "/tmp/r",
        "--result-filename", "run.json",
    ]  # fmt: skip


def test_seed_flags_are_written_in_full_names_only() -> None:
    args = presets.bench_args("seed", context_len=262144, **COMMON)
    for short in ABBREVIATIONS:
        assert short not in args


def _value(args: list[str], flag: str) -> str:
    return args[args.index(flag) + 1]


def test_seed_preset_scales_down_to_a_small_window_keeping_its_shape() -> None:
    args = presets.bench_args("seed", context_len=1024, **COMMON)
    inp = int(_value(args, "--random-input-len"))
    out = int(_value(args, "--random-output-len"))
    assert inp + out <= 1024 - presets.HEADROOM_TOKENS
    assert inp == 2 * out or abs(inp - 2 * out) <= 2  # the seed's 2048:1024


def test_overrides_replace_the_preset_values() -> None:
    args = presets.bench_args(
        "seed",
        context_len=4096,
        num_prompts=20,
        random_input=128,
        random_output=64,
        max_concurrency=5,
        **COMMON,
    )
    assert _value(args, "--num-prompts") == "20"
    assert _value(args, "--random-input-len") == "128"
    assert _value(args, "--random-output-len") == "64"
    assert _value(args, "--max-concurrency") == "5"


def test_typed_lengths_that_do_not_fit_are_refused_not_shrunk() -> None:
    with pytest.raises(BadInputError, match="do not fit"):
        presets.bench_args("chat", context_len=512, random_input=500, **COMMON)


def test_concurrency_never_exceeds_the_number_of_prompts() -> None:
    args = presets.bench_args("seed", context_len=8192, num_prompts=3, **COMMON)
    assert _value(args, "--max-concurrency") == "3"


def test_long_preset_is_one_prompt_near_the_window() -> None:
    args = presets.bench_args("long", context_len=32768, **COMMON)
    inp = int(_value(args, "--random-input-len"))
    out = int(_value(args, "--random-output-len"))
    assert _value(args, "--num-prompts") == "1"
    assert _value(args, "--max-concurrency") == "1"
    assert inp + out == 32768 - presets.HEADROOM_TOKENS
    assert out == 256


def test_long_preset_on_a_tiny_window_still_fits() -> None:
    args = presets.bench_args("long", context_len=300, **COMMON)
    inp = int(_value(args, "--random-input-len"))
    out = int(_value(args, "--random-output-len"))
    assert inp >= 1
    assert out >= 1
    assert inp + out <= 300 - presets.HEADROOM_TOKENS


def test_image_preset_uses_random_mm_on_the_chat_endpoint() -> None:
    args = presets.bench_args("image", context_len=65536, **COMMON)
    assert _value(args, "--backend") == "openai-chat"
    assert _value(args, "--endpoint") == "/v1/chat/completions"
    assert _value(args, "--dataset-name") == "random-mm"
    assert _value(args, "--random-mm-base-items-per-request") == "1"
    assert _value(args, "--random-mm-limit-mm-per-prompt") == '{"image": 1, "video": 0}'
    assert _value(args, "--random-mm-bucket-config") == "{(728, 728, 1): 1.0}"


def test_image_preset_leaves_room_for_the_image_tokens() -> None:
    args = presets.bench_args("image", context_len=600, **COMMON)
    inp = int(_value(args, "--random-input-len"))
    out = int(_value(args, "--random-output-len"))
    assert inp + out + presets.IMAGE_TOKENS <= 600 - presets.HEADROOM_TOKENS


def test_window_too_small_for_any_run_is_a_clear_error() -> None:
    with pytest.raises(BadInputError, match="too small"):
        presets.bench_args("image", context_len=200, **COMMON)


def test_unknown_preset_names_the_choices() -> None:
    with pytest.raises(BadInputError, match="seed, chat, long, image"):
        presets.get_preset("fast")


@pytest.mark.parametrize("flag", ["num_prompts", "max_concurrency", "random_input"])
def test_zero_or_negative_values_are_refused(flag: str) -> None:
    with pytest.raises(BadInputError, match="at least 1"):
        presets.bench_args("seed", context_len=8192, **{flag: 0}, **COMMON)  # type: ignore[arg-type]


def test_every_flag_is_one_vllm_bench_serve_accepts() -> None:
    # The captured `vllm bench serve --help=all` of vLLM 0.32 lists every flag the parser takes.
    help_text = (REPO / "tests" / "data" / "vllm_bench_serve_help_0.32.txt").read_text()
    for name in presets.PRESETS:
        args = presets.bench_args(name, context_len=65536, **COMMON)
        for token in args:
            if token.startswith("--"):
                assert f"  {token} " in help_text or f"  {token}\n" in help_text, token


def test_long_preset_with_too_many_output_tokens_is_refused() -> None:
    with pytest.raises(BadInputError, match="no room for a prompt"):
        presets.bench_args("long", context_len=1024, random_output=2000, **COMMON)


def test_bench_env_keeps_the_key_out_of_the_argv() -> None:
    env = presets.bench_env("sk-secret")
    assert env["OPENAI_API_KEY"] == "sk-secret"
    assert "127.0.0.1" in env["NO_PROXY"]
    assert env["PYTHONUNBUFFERED"] == "1"
    assert env["VLLM_USE_RUST_BENCH"] == "0"
    assert "OPENAI_API_KEY" not in presets.bench_env()
    assert not any("sk-secret" in t for t in presets.bench_args("seed", context_len=8192, **COMMON))
