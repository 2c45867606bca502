"""Benchmark presets as data, and the argv of `vllm bench serve` built from them.

The seed model card benchmarks with

    vllm bench serve --backend vllm --model stepfun-ai/Step-3.7-Flash --endpoint /v1/completions
      --dataset-name random --random-input 2048 --random-output 1024 --max-concurrency 10
      --num-prompt 100

The `seed` preset is that line with the abbreviations written out (`--random-input` is accepted
only as an argparse prefix of `--random-input-len`, which a later vLLM flag can make ambiguous),
plus what the appliance must add for the run to work here and to be comparable between vLLM
versions (see `bench_args`). Facts and sources: docs/moe-tuning.md, "`vllm bench serve` facts".
"""

from __future__ import annotations

from dataclasses import dataclass

from appliance.errors import BadInputError

BENCH_COMMAND = ("vllm", "bench", "serve")

# Tokens kept free between input + output and the window. `random` decodes random token ids and
# vLLM re-encodes them; the count can drift by a few tokens ("there were 3 more tokens than
# expected after decoding and re-encoding", vLLM 0.32's own warning), and the server adds BOS.
HEADROOM_TOKENS = 32

# What one 728x728 image costs in the prompt: 169 tokens for Step3-VL's global view (measured on
# 0.32, ../shared/reference/vllm.md), plus the chat template's image markers, rounded up.
IMAGE_TOKENS = 256

# The image preset's picture: one 728x728 frame, the size Step3-VL takes without cropping.
IMAGE_BUCKET = "{(728, 728, 1): 1.0}"
IMAGE_LIMIT = '{"image": 1, "video": 0}'

# Percentiles written into the result file: p99 for the table, p90 for the plots. Set
# explicitly because the defaults differ between vLLM versions.
PERCENTILE_METRICS = "ttft,tpot,itl,e2el"
METRIC_PERCENTILES = "90,99"


@dataclass(frozen=True)
class Preset:
    """One benchmark a person would pick: the workload, not where it runs."""

    name: str
    title: str
    backend: str
    endpoint: str
    dataset_name: str
    random_input: int
    random_output: int
    num_prompts: int
    max_concurrency: int
    # The long preset takes its input length from the window instead of `random_input`.
    fill_window: bool = False
    # Tokens the prompt costs beyond the random text (an image).
    extra_prompt_tokens: int = 0
    extra_args: tuple[str, ...] = ()


PRESETS: dict[str, Preset] = {
    preset.name: preset
    for preset in (
        Preset(
            name="seed",
            title="The model card's benchmark: 100 prompts of 2048 tokens, 1024 out, 10 at a time",
            backend="vllm",
            endpoint="/v1/completions",
            dataset_name="random",
            random_input=2048,
            random_output=1024,
            num_prompts=100,
            max_concurrency=10,
        ),
        Preset(
            name="chat",
            title="Chat-like: 200 short prompts (256 tokens in, 256 out), 16 at a time",
            backend="vllm",
            endpoint="/v1/completions",
            dataset_name="random",
            random_input=256,
            random_output=256,
            num_prompts=200,
            max_concurrency=16,
        ),
        Preset(
            name="long",
            title="Long context: one prompt that fills the window, 256 tokens out",
            backend="vllm",
            endpoint="/v1/completions",
            dataset_name="random",
            random_input=0,
            random_output=256,
            num_prompts=1,
            max_concurrency=1,
            fill_window=True,
        ),
        Preset(
            name="image",
            title="Image: 50 chats of one 728x728 image and 128 tokens of text, 4 at a time",
            # Multi-modal content is refused on the `vllm` backend ("use one of ['openai-audio',
            # 'openai-chat']"); the chat backend also checks the URL ends in chat/completions.
            backend="openai-chat",
            endpoint="/v1/chat/completions",
            dataset_name="random-mm",
            random_input=128,
            random_output=256,
            num_prompts=50,
            max_concurrency=4,
            extra_prompt_tokens=IMAGE_TOKENS,
            extra_args=(
                "--random-mm-base-items-per-request",
                "1",
                "--random-mm-limit-mm-per-prompt",
                IMAGE_LIMIT,
                "--random-mm-bucket-config",
                IMAGE_BUCKET,
            ),
        ),
    )
}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise BadInputError(
            f"No benchmark preset named {name!r}.",
            hint=f"Pick one of: {', '.join(PRESETS)}.",
        ) from None


@dataclass(frozen=True)
class Workload:
    """The token counts and load one run will use, after scaling to the window."""

    random_input: int
    random_output: int
    num_prompts: int
    max_concurrency: int
    scaled: bool


def workload(
    preset: Preset,
    *,
    context_len: int,
    num_prompts: int | None = None,
    random_input: int | None = None,
    random_output: int | None = None,
    max_concurrency: int | None = None,
) -> Workload:
    """The preset's numbers with the person's overrides, made to fit `context_len`.

    A preset's own lengths are scaled down (keeping their ratio) when the engine's window is
    smaller than they need; lengths the person typed are never changed silently: they raise."""
    for label, value in (
        ("--num-prompts", num_prompts),
        ("--random-input", random_input),
        ("--random-output", random_output),
        ("--max-concurrency", max_concurrency),
    ):
        if value is not None and value < 1:
            raise BadInputError(f"{label} must be at least 1 (got {value}).")
    budget = context_len - HEADROOM_TOKENS - preset.extra_prompt_tokens
    if budget < 2:
        raise BadInputError(
            f"The engine's context window ({context_len} tokens) is too small to benchmark the "
            f"{preset.name!r} preset.",
            hint="Start the engine with a larger context length.",
        )
    out = random_output if random_output is not None else preset.random_output
    if preset.fill_window and random_input is None:
        out = min(out, budget // 2) if random_output is None else out
        inp = budget - out
    else:
        inp = random_input if random_input is not None else preset.random_input
    scaled = False
    if inp + out > budget:
        if random_input is not None or random_output is not None:
            raise BadInputError(
                f"{inp} input + {out} output tokens do not fit the engine's context window of "
                f"{context_len} tokens ({budget} usable for this preset).",
                hint="Ask for fewer tokens, or start the engine with a larger context length.",
            )
        # Keep the preset's shape (input:output ratio), shrink both.
        inp, out = inp * budget // (inp + out), out * budget // (inp + out)
        inp, out = max(inp, 1), max(out, 1)
        scaled = True
    if inp < 1:
        raise BadInputError(
            f"{out} output tokens leave no room for a prompt in the engine's context window of "
            f"{context_len} tokens ({budget} usable for this preset).",
            hint="Ask for fewer output tokens.",
        )
    prompts = num_prompts if num_prompts is not None else preset.num_prompts
    concurrency = max_concurrency if max_concurrency is not None else preset.max_concurrency
    return Workload(
        random_input=inp,
        random_output=out,
        num_prompts=prompts,
        max_concurrency=min(concurrency, prompts),
        scaled=scaled,
    )


def bench_args(
    preset: Preset | str,
    *,
    model: str,
    served_model_name: str,
    base_url: str,
    tokenizer: str,
    context_len: int,
    num_prompts: int | None = None,
    random_input: int | None = None,
    random_output: int | None = None,
    max_concurrency: int | None = None,
    result_dir: str,
    result_filename: str,
) -> list[str]:
    """The argv of `vllm bench serve` (after `vllm bench serve`) for one run.

    First the seed's flags in the seed's order with full names; then what the appliance adds:

    - `--served-model-name`: the engine serves `step3p7-flash`; a request naming the checkpoint
      id (`--model`) gets 404 "model does not exist", so every request would fail.
    - `--base-url`: the engine's (or the gateway's) TCP address; bench speaks TCP only.
    - `--tokenizer`: bench tokenizes on the client even for random prompts; offline it must be
      the local snapshot, not a hub id.
    - `--temperature 0`: vLLM 0.32 stopped sending temperature (older copies forced 0), so runs
      are comparable between versions only when it is explicit.
    - `--ready-check-timeout-sec 0`: the appliance checks the engine answers before it starts the
      run; the default changed from 600 to 0 between versions, so it is explicit too.
    - `--percentile-metrics` / `--metric-percentiles`: which `p*_..._ms` keys the file has.
    - `--save-result --result-dir --result-filename`: the result file the appliance reads.
    """
    if isinstance(preset, str):
        preset = get_preset(preset)
    load = workload(
        preset,
        context_len=context_len,
        num_prompts=num_prompts,
        random_input=random_input,
        random_output=random_output,
        max_concurrency=max_concurrency,
    )
    return [
        "--backend",
        preset.backend,
        "--model",
        model,
        "--endpoint",
        preset.endpoint,
        "--dataset-name",
        preset.dataset_name,
        "--random-input-len",
        str(load.random_input),
        "--random-output-len",
        str(load.random_output),
        "--max-concurrency",
        str(load.max_concurrency),
        "--num-prompts",
        str(load.num_prompts),
        *preset.extra_args,
        "--served-model-name",
        served_model_name,
        "--base-url",
        base_url,
        "--tokenizer",
        tokenizer,
        "--temperature",
        "0",
        "--ready-check-timeout-sec",
        "0",
        "--percentile-metrics",
        PERCENTILE_METRICS,
        "--metric-percentiles",
        METRIC_PERCENTILES,
        "--save-result",
        "--result-dir",
        result_dir,
        "--result-filename",
        result_filename,
    ]


def bench_env(api_key: str | None = None) -> dict[str, str]:
    """Environment entries for the `vllm bench serve` process (on top of a clean base).

    - `OPENAI_API_KEY`: bench sends it as `Authorization: Bearer` on every completion/chat
      request (the gateway wants a key); in the environment it stays out of `ps`, where a
      `--header` would show it.
    - `NO_PROXY`: bench's HTTP session trusts the environment's proxies; loopback must not go
      through one.
    - `PYTHONUNBUFFERED`: its phase lines reach a pipe as they happen.
    - `VLLM_USE_RUST_BENCH=0`: 0.32 hands the whole command to a Rust binary when it is 1.
    """
    env = {
        "NO_PROXY": "127.0.0.1,localhost,::1",
        "no_proxy": "127.0.0.1,localhost,::1",
        "PYTHONUNBUFFERED": "1",
        "VLLM_USE_RUST_BENCH": "0",
    }
    if api_key:
        env["OPENAI_API_KEY"] = api_key
    return env
