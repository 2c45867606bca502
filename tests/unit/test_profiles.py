"""Launch profiles: every `vllm serve` command in the seed model card, reproduced token for token,
and the appliance's own flags added on top."""

from __future__ import annotations

import dataclasses
import json
import re
import shlex
from pathlib import Path

import pytest

from appliance import endpoint, profiles
from appliance.cli import main
from appliance.errors import SettingsError
from appliance.settings import EngineSettings

REPO = Path(__file__).resolve().parents[2]
BUNDLED_SEED = REPO / "tests" / "data" / "seed_model_card.txt"
SHARED_SEEDS = sorted((REPO.parent / "shared" / "seed").glob("*.txt"))


def seed_text() -> str:
    """The seed model card: ../shared/seed/*.txt when the checkout has it, else the copy."""
    if SHARED_SEEDS:
        return SHARED_SEEDS[0].read_text(encoding="utf-8")
    return BUNDLED_SEED.read_text(encoding="utf-8")


def shell_commands(text: str, start: str) -> list[list[str]]:
    """Every command in `text` whose first line starts with `start`, continuation lines joined
    and split the way a shell would."""
    commands: list[list[str]] = []
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if not line.startswith(start):
            continue
        joined = line
        j = i
        while joined.rstrip().endswith("\\"):
            j += 1
            joined = joined.rstrip()[:-1] + " " + lines[j]
        commands.append(shlex.split(joined))
    return commands


def seed_vllm_serve_commands() -> list[list[str]]:
    return shell_commands(seed_text(), "vllm serve ")


def test_bundled_seed_copy_matches_the_shared_seed() -> None:
    if not SHARED_SEEDS:
        pytest.skip("../shared/seed is not in this checkout; the bundled copy is used")
    assert BUNDLED_SEED.read_text(encoding="utf-8") == SHARED_SEEDS[0].read_text(encoding="utf-8")


def test_seed_has_the_four_serve_commands_we_expect() -> None:
    commands = seed_vllm_serve_commands()
    # BF16, FP8, NVFP4 (4xB200), DGX Station FP8; `vllm bench serve` is not a launch.
    assert [c[2] for c in commands] == [
        "stepfun-ai/Step-3.7-Flash",
        "stepfun-ai/Step-3.7-Flash-FP8",
        "stepfun-ai/Step-3.7-Flash-NVFP4",
        "stepfun-ai/Step-3.7-Flash-FP8",
    ]


@pytest.mark.parametrize(
    ("index", "name"), [(0, "bf16-tp8"), (1, "fp8-tp8"), (2, "nvfp4-tp4"), (3, "fp8-tp1")]
)
def test_seed_command_is_reproduced_token_for_token(index: int, name: str) -> None:
    seed = seed_vllm_serve_commands()[index]
    assert profiles.seed_command(profiles.get_profile(name)) == seed


def test_station_nvfp4_is_the_station_command_with_the_nvfp4_checkpoint() -> None:
    text = seed_text()
    # The seed gives the NVFP4 Station launch as a sentence, not a command.
    assert "Swap in stepfun-ai/Step-3.7-Flash-NVFP4 to run the NVFP4 checkpoint" in " ".join(
        text.split()
    )
    station = seed_vllm_serve_commands()[3]
    expected = [*station[:2], "stepfun-ai/Step-3.7-Flash-NVFP4", *station[3:]]
    assert profiles.seed_command(profiles.get_profile("nvfp4-tp1")) == expected


def test_every_profile_comes_from_the_seed_and_every_seed_command_has_a_profile() -> None:
    seeds = seed_vllm_serve_commands()
    station = seeds[3]
    derived = [*station[:2], "stepfun-ai/Step-3.7-Flash-NVFP4", *station[3:]]
    commands = [profiles.seed_command(p) for p in profiles.PROFILES.values()]
    for command in commands:
        assert command in [*seeds, derived]
    for seed in seeds:
        assert seed in commands
    assert set(profiles.PROFILES) == {"fp8-tp1", "nvfp4-tp1", "bf16-tp8", "fp8-tp8", "nvfp4-tp4"}


def _pairs(tokens: list[str]) -> set[tuple[str, str]]:
    """Flags with their values ("" for switches) from an argv after the model."""
    pairs: set[tuple[str, str]] = set()
    i = 0
    while i < len(tokens):
        flag = tokens[i]
        value = tokens[i + 1] if i + 1 < len(tokens) and not tokens[i + 1].startswith("--") else ""
        pairs.add((flag, value))
        i += 2 if value else 1
    return pairs


def test_seed_docker_example_agrees_with_the_station_profile() -> None:
    (docker,) = shell_commands(seed_text(), "docker run ")
    image = docker.index("vllm/vllm-openai:stepfun37")
    container_args = docker[image + 1 :]
    profile = profiles.get_profile("fp8-tp1")
    assert container_args[0] == profile.checkpoint
    # The example orders the flags differently and leaves out the served name and TP1.
    assert _pairs(container_args[1:]) <= _pairs(list(profile.seed_flags))
    # Our docker run keeps the container options NVIDIA's Station setup uses.
    ours = profiles.docker_run_command(profile, EngineSettings(), ["GPU-1234"])
    for option in (["--ipc", "host"], ["--ulimit", "memlock=-1"], ["--ulimit", "stack=67108864"]):
        assert _contains(docker, option)
        assert _contains(ours, option)


def _contains(argv: list[str], part: list[str]) -> bool:
    return any(argv[i : i + len(part)] == part for i in range(len(argv)))


@pytest.mark.parametrize("name", list(profiles.PROFILES))
def test_build_args_starts_with_the_seed_command_exactly(name: str) -> None:
    profile = profiles.get_profile(name)
    args = profiles.build_vllm_args(profile, EngineSettings())
    seed_after_serve = profiles.seed_command(profile)[2:]
    assert args[: len(seed_after_serve)] == seed_after_serve
    assert args[0] == profile.checkpoint  # the image's entrypoint is already `vllm serve`
    assert "serve" not in args


def test_appliance_flags_follow_the_seed() -> None:
    engine = EngineSettings(port=8123, max_model_len=131072, max_images_per_prompt=3)
    profile = profiles.get_profile("fp8-tp1")
    args = profiles.build_vllm_args(profile, engine, uds="/run/s/engine.sock")
    tail = args[len(profiles.seed_command(profile)) - 2 :]
    assert tail == [
        "--disable-cascade-attn",
        "--uds",  # the private socket, no port (appliance/endpoint.py)
        "/run/s/engine.sock",
        "--max-model-len",
        "131072",
        "--limit-mm-per-prompt",
        '{"image": 3}',
    ]
    assert json.loads(args[args.index("--limit-mm-per-prompt") + 1]) == {"image": 3}
    # Nothing appears twice.
    flags = [a for a in args if a.startswith("--")]
    assert len(flags) == len(set(flags))
    # without a path given, the host's socket path; on TCP, loopback and the port
    default = profiles.build_vllm_args(profile, engine)
    assert default[default.index("--uds") + 1] == str(endpoint.socket_path(engine.container_name))
    engine = dataclasses.replace(engine, listen="tcp")
    tcp = profiles.build_vllm_args(profile, engine)
    assert _contains(tcp, ["--host", "127.0.0.1", "--port", "8123"])
    assert "--uds" not in tcp
    engine = dataclasses.replace(engine, listen="udp")
    with pytest.raises(SettingsError, match=r"engine\.listen"):
        profiles.build_vllm_args(profile, engine)


def test_served_model_name_is_the_seeds() -> None:
    for name in ("fp8-tp1", "nvfp4-tp1", "bf16-tp8", "fp8-tp8"):
        assert profiles.get_profile(name).served_model_name == "step3p7-flash"
    assert profiles.get_profile("nvfp4-tp4").served_model_name == "step3p7"  # as the seed has it
    args = profiles.build_vllm_args(profiles.get_profile("fp8-tp1"), EngineSettings())
    assert args.count("--served-model-name") == 1
    assert args[args.index("--served-model-name") + 1] == "step3p7-flash"


def test_memory_utilization_override_replaces_the_seed_value_in_place() -> None:
    engine = EngineSettings(gpu_memory_utilization=0.9)
    station = profiles.build_vllm_args(profiles.get_profile("fp8-tp1"), engine)
    assert station.count("--gpu-memory-utilization") == 1
    i = station.index("--gpu-memory-utilization")
    assert station[i + 1] == "0.9"
    assert i == profiles.get_profile("fp8-tp1").seed_flags.index("--gpu-memory-utilization") + 1
    tp8 = profiles.build_vllm_args(profiles.get_profile("fp8-tp8"), engine)
    assert tp8[tp8.index("--gpu-memory-utilization") + 1] == "0.9"


def test_mtp_only_where_the_checkpoint_has_mtp_weights() -> None:
    on = EngineSettings(mtp=True)
    fp8 = profiles.build_vllm_args(profiles.get_profile("fp8-tp1"), on)
    assert fp8[fp8.index("--speculative-config") + 1] == (
        '{"method": "mtp", "num_speculative_tokens": 3}'
    )
    assert json.loads(fp8[fp8.index("--speculative-config") + 1]) == {
        "method": "mtp",
        "num_speculative_tokens": 3,
    }
    assert "--speculative-config" not in profiles.build_vllm_args(
        profiles.get_profile("nvfp4-tp1"), on
    )
    assert "--speculative-config" not in profiles.build_vllm_args(
        profiles.get_profile("fp8-tp1"), EngineSettings(mtp=False)
    )
    # The TP8 seed commands carry MTP themselves: never twice.
    assert (
        profiles.build_vllm_args(profiles.get_profile("fp8-tp8"), on).count("--speculative-config")
        == 1
    )


def test_sleep_mode_adds_the_flag_and_dev_mode() -> None:
    engine = EngineSettings(sleep_mode=True)
    profile = profiles.get_profile("fp8-tp1")
    assert profiles.build_vllm_args(profile, engine)[-1] == "--enable-sleep-mode"
    assert profiles.engine_environment(profile, engine) == {"VLLM_SERVER_DEV_MODE": "1"}
    assert "--enable-sleep-mode" not in profiles.build_vllm_args(profile, EngineSettings())
    assert profiles.engine_environment(profile, EngineSettings()) == {}


def test_model_override_and_listen_host() -> None:
    engine = EngineSettings(model_override="/models/step-local", listen="tcp")
    args = profiles.build_vllm_args(profiles.get_profile("fp8-tp1"), engine, listen_host="0.0.0.0")
    assert args[0] == "/models/step-local"
    assert args[args.index("--host") + 1] == "0.0.0.0"


def test_unknown_profile_names_the_choices() -> None:
    with pytest.raises(SettingsError, match=r"fp8-tp1, nvfp4-tp1, bf16-tp8, fp8-tp8, nvfp4-tp4"):
        profiles.get_profile("fp16-tp2")


def test_docker_run_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", "hf_secret_value")
    engine = EngineSettings(port=8011, hf_cache_dir="/data/hf", sleep_mode=True)
    profile = profiles.get_profile("fp8-tp1")
    cmd = profiles.docker_run_command(profile, engine, ["GPU-abc"])
    assert cmd[:2] == ["docker", "run"]
    assert _contains(cmd, ["--gpus", "device=GPU-abc"])
    # as the appliance runs it: vLLM on the private socket folder, mounted; nothing published
    folder = endpoint.socket_dir(engine.container_name)
    assert _contains(cmd, ["-v", f"{folder}:/run/step-station-socket"])
    assert "--network" not in cmd
    assert "-p" not in cmd
    assert _contains(cmd, ["-v", "/data/hf:/root/.cache/huggingface"])
    assert _contains(cmd, ["-e", "VLLM_SERVER_DEV_MODE=1"])
    assert _contains(cmd, ["-e", "HF_TOKEN"])  # passed through by name
    assert "hf_secret_value" not in " ".join(cmd)
    image = cmd.index(engine.image)
    inner = cmd[image + 1 :]
    assert inner[:-2] == profiles.build_vllm_args(
        profile, engine, uds="/run/step-station-socket/engine.sock"
    )
    assert inner[inner.index("--uds") + 1] == "/run/step-station-socket/engine.sock"
    assert inner[-2:] == ["--allowed-origins", "[]"]
    # on TCP: the host's network, vLLM on its loopback
    engine = dataclasses.replace(engine, listen="tcp")
    tcp = profiles.docker_run_command(profile, engine, ["GPU-abc"])
    assert _contains(tcp, ["--network", "host"])
    assert tcp[tcp.index("--host") + 1] == "127.0.0.1"
    engine = dataclasses.replace(engine, listen="socket")
    assert _contains(cmd, ["-e", "VLLM_API_KEY"])  # by name only
    several = profiles.docker_run_command(
        profiles.get_profile("fp8-tp8"), engine, ["GPU-a", "GPU-b"]
    )
    assert shlex.split(shlex.join(several))[several.index("--gpus") + 1] == '"device=GPU-a,GPU-b"'
    assert _contains(profiles.docker_run_command(profile, engine), ["--gpus", "all"])


def test_plan_print_command_prints_vllm_serve_then_docker_run(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["plan", "--hardware", "gb300", "--print-command", "fp8-tp1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2
    profile = profiles.get_profile("fp8-tp1")
    assert shlex.split(lines[0]) == [
        "vllm",
        "serve",
        *profiles.build_vllm_args(profile, EngineSettings()),
    ]
    docker = shlex.split(lines[1])
    assert docker[:2] == ["docker", "run"]
    inner = profiles.build_vllm_args(
        profile, EngineSettings(), uds="/run/step-station-socket/engine.sock"
    )
    assert docker[-len(inner) - 2 :] == [*inner, "--allowed-origins", "[]"]


def test_plan_print_command_uses_settings(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "set", "engine.max_model_len", "65536"]) == 0
    assert main(["config", "set", "engine.mtp", "true"]) == 0
    capsys.readouterr()
    assert main(["plan", "--hardware", "gb300", "--print-command", "fp8-tp1"]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert re.search(r"--max-model-len 65536\b", first)
    assert "--speculative-config" in first


def test_plan_print_command_unknown_profile_is_a_clear_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["plan", "--print-command", "nope"]) == SettingsError.exit_code
    err = capsys.readouterr().err
    assert "Unknown launch profile 'nope'" in err
    assert "fp8-tp1" in err


@pytest.mark.parametrize("hf_cache_dir", ["", "/data/hf"])
def test_hf_cache_path_matches_the_engine_spec(
    hf_cache_dir: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    spec = pytest.importorskip("appliance.engine.spec")
    engine = EngineSettings(hf_cache_dir=hf_cache_dir)
    assert profiles.hf_cache_path(engine) == spec.hf_cache_root(engine)
    monkeypatch.delenv("STEP_STATION_HOME")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    assert profiles.hf_cache_path(engine) == spec.hf_cache_root(engine)


@pytest.mark.parametrize("name", list(profiles.PROFILES))
def test_simulator_accepts_what_the_appliance_passes(name: str) -> None:
    """The simulator parses `vllm serve`'s flags like vLLM (unknown flags exit 2), so every
    profile's argv, appliance flags included, must parse there with the values we meant."""
    args_module = pytest.importorskip("appliance.simulator.args")
    engine = EngineSettings(
        port=8123, max_model_len=65536, mtp=True, sleep_mode=True, gpu_memory_utilization=0.9
    )
    profile = profiles.get_profile(name)
    parsed = args_module.parse_args(profiles.build_vllm_args(profile, engine))
    assert parsed.model == profile.checkpoint
    assert parsed.served_name == profile.served_model_name
    assert parsed.uds == str(endpoint.socket_path(engine.container_name))
    engine = dataclasses.replace(engine, listen="tcp")
    on_tcp = args_module.parse_args(profiles.build_vllm_args(profile, engine))
    assert on_tcp.host == "127.0.0.1"
    assert on_tcp.port == 8123
    assert on_tcp.uds is None
