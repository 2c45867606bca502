"""The simulator's argv is `vllm serve`'s: every launch command of the seed model card parses, and
bad flags fail the way vLLM's argparse fails (exit 2, usage, "unrecognized arguments")."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from appliance.simulator.args import parse_args

SEED = Path(__file__).resolve().parents[1] / "data" / "seed_model_card.txt"


def seed_commands() -> list[list[str]]:
    """Arguments after `vllm serve` (or after the image name of `docker run`) in the seed."""
    text = SEED.read_text().replace("\\\n", " ")
    commands = []
    for line in text.splitlines():
        if not line.startswith(("vllm serve ", "docker run ")):
            continue
        words = shlex.split(line)
        if words[:2] == ["vllm", "serve"]:
            commands.append(words[2:])
        elif words[:2] == ["docker", "run"] and "vllm/vllm-openai:stepfun37" in words:
            commands.append(words[words.index("vllm/vllm-openai:stepfun37") + 1 :])
    return commands


def test_the_seed_has_launch_commands() -> None:
    assert len(seed_commands()) >= 5


@pytest.mark.parametrize("argv", seed_commands(), ids=lambda a: a[0])
def test_every_seed_command_parses(argv: list[str]) -> None:
    args = parse_args(argv)
    assert args.model == argv[0]
    assert args.reasoning_parser == "step3p5"
    assert args.served_name in ("step3p7-flash", "step3p7", argv[0])


def test_flags_that_change_behaviour() -> None:
    args = parse_args(
        [
            "m", "--served-model-name", "a", "b", "--host", "127.0.0.1", "--port", "8001",
            "--api-key", "k", "--max-model-len", "64K", "--limit-mm-per-prompt", '{"image": 2}',
            "--enable-sleep-mode", "--speculative-config", '{"num_speculative_tokens": 3}',
            "-tp", "4", "--no-async-scheduling", "--quantization", "modelopt",
        ]
    )  # fmt: skip
    assert args.served_model_names == ("a", "b")
    assert (args.host, args.port, args.api_keys) == ("127.0.0.1", 8001, ("k",))
    assert args.max_model_len == 65536
    assert args.limit_mm_per_prompt == {"image": 2}
    assert args.enable_sleep_mode
    assert args.num_speculative_tokens == 3
    assert args.tensor_parallel_size == 4


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["m", "--bogus"], "unrecognized arguments: --bogus"),
        (["serve", "m"], "unrecognized arguments: m"),
        (["m", "--kv-cache-dtype", "fp7"], "argument --kv-cache-dtype: invalid choice: 'fp7'"),
        (["m", "--speculative-config", "{not json"], "argument --speculative-config"),
        (["m", "--port", "eighty"], "argument --port: invalid int value: 'eighty'"),
    ],
)
def test_bad_flags_exit_2(argv: list[str], message: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_:
        parse_args(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    # Unknown arguments come from vLLM's top-level parser, bad values from `vllm serve`'s.
    prog = "vllm" if message.startswith("unrecognized") else "vllm serve"
    assert err.startswith("usage: vllm [-h] [-v]" if prog == "vllm" else "usage: vllm serve ")
    assert f"{prog}: error: {message}" in err
