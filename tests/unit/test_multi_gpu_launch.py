"""The seed's multi-GPU commands on a simulated 8-GPU host (fixtures/multi_gpu_nvml.py; NVML is
the seam that cannot run here): TP8, TP4 and data-parallel profiles get exactly their GPUs by
UUID in the Docker DeviceRequest, and the seed's flags token for token (expert parallel, MTP-3).
tests/integration/test_multi_gpu_docker.py hands the same spec to the real Docker engine."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
from fixtures.multi_gpu_nvml import simulated_host

from appliance import endpoint, hardware, planner, profiles
from appliance import settings as st
from appliance.commands.plan import render
from appliance.engine.docker_runtime import container_kwargs
from appliance.engine.launch import launch_spec_for
from appliance.engine.spec import LaunchSpec
from appliance.errors import HardwareError, SettingsError

REPO = Path(__file__).resolve().parents[2]
SHARED_SEEDS = sorted((REPO.parent / "shared" / "seed").glob("*.txt"))
SEED = SHARED_SEEDS[0] if SHARED_SEEDS else REPO / "tests" / "data" / "seed_model_card.txt"
MTP = '{"method": "mtp", "num_speculative_tokens": 3}'


def seed_serve_commands() -> dict[str, list[str]]:
    """The seed's `vllm serve` commands (continuation lines joined, split as a shell would),
    by checkpoint and TP size: {"stepfun-ai/Step-3.7-Flash-FP8 tp8": [...], ...}."""
    lines = SEED.read_text(encoding="utf-8").splitlines()
    found: dict[str, list[str]] = {}
    for i, line in enumerate(lines):
        if not line.startswith("vllm serve "):
            continue
        joined = line
        while joined.rstrip().endswith("\\"):
            i += 1
            joined = joined.rstrip()[:-1] + " " + lines[i]
        argv = shlex.split(joined)
        found[f"{argv[2]} tp{argv[argv.index('--tensor-parallel-size') + 1]}"] = argv
    return found


def _settings(profile: str, **engine: object) -> st.Settings:
    changes = {"engine.profile": profile, "engine.runtime": "docker", "engine.request_gpu": True}
    return st.with_changes(st.Settings(), changes | {f"engine.{k}": v for k, v in engine.items()})


def _device_ids(spec: LaunchSpec) -> list[str]:
    (request,) = container_kwargs(spec)["device_requests"]
    assert request["Capabilities"] == [["gpu"]]
    assert "Count" not in request or request["Count"] in (0, None)  # by UUID, not "all"
    return list(request["DeviceIDs"])


def _assert_seed_then_ours(spec: LaunchSpec, seed: list[str], added: list[str]) -> None:
    """The container's command is the seed's after `vllm serve`, token for token, then what the
    profile adds (`added`), then the appliance's own flags (none of which repeats a seed flag)."""
    assert seed[:2] == ["vllm", "serve"]
    n = len(seed) - 2
    assert list(spec.args[:n]) == seed[2:]
    assert list(spec.args[n : n + len(added)]) == added
    ours = [a for a in spec.args[n + len(added) :] if a.startswith("--")]
    assert ours[:1] == ["--uds"]
    assert spec.arg_value("--uds") == endpoint.CONTAINER_SOCKET
    assert not set(ours) & {a for a in seed if a.startswith("--")}


@pytest.mark.parametrize(
    ("profile", "checkpoint"),
    [("fp8-tp8", "stepfun-ai/Step-3.7-Flash-FP8"), ("bf16-tp8", "stepfun-ai/Step-3.7-Flash")],
)
def test_tp8_gets_all_eight_gpus_by_uuid_and_the_seeds_flags(
    station_home: Path, profile: str, checkpoint: str
) -> None:
    with simulated_host("h200", 8) as nvml:
        spec = launch_spec_for(_settings(profile), secrets=st.Secrets())
    assert spec.profile == profile
    assert spec.gpus == tuple(nvml.uuids_by_index)
    assert sorted(_device_ids(spec)) == sorted(nvml.uuids_by_index)  # all 8, each once
    assert len(set(_device_ids(spec))) == 8
    _assert_seed_then_ours(spec, seed_serve_commands()[f"{checkpoint} tp8"], [])
    assert spec.arg_value("--tensor-parallel-size") == "8"
    assert "--enable-expert-parallel" in spec.args
    assert spec.arg_value("--speculative-config") == MTP  # MTP-3 from the seed, once
    assert spec.args.count("--speculative-config") == 1
    assert spec.ipc_mode == "host"  # NCCL's shared memory between the 8 workers
    assert ("memlock", -1, -1) in spec.ulimits


def test_nvfp4_tp4_gets_exactly_four_gpus_of_eight(station_home: Path) -> None:
    with simulated_host("b200", 8) as nvml:
        spec = launch_spec_for(_settings("nvfp4-tp4"), secrets=st.Secrets())
    four = nvml.uuids_by_index[:4]  # the planner's best four: NVML order among equals
    assert spec.gpus == tuple(four)
    assert _device_ids(spec) == four
    assert not set(_device_ids(spec)) & set(nvml.uuids_by_index[4:])
    seed = seed_serve_commands()["stepfun-ai/Step-3.7-Flash-NVFP4 tp4"]
    _assert_seed_then_ours(spec, seed, [])
    assert "--enable-expert-parallel" in spec.args
    assert "--speculative-config" not in spec.args  # the NVFP4 checkpoint has no MTP weights


def test_the_plan_offers_data_parallel_where_a_replica_needs_fewer_gpus() -> None:
    with simulated_host("b200", 8) as nvml:
        plan = planner.plan(hardware.detect())
    names = [f.name for f in plan.profiles]
    assert "nvfp4-tp4-dp2" in names  # 4 GPUs per replica, 8 on the host
    assert not any(n.startswith(("fp8-tp8-dp", "bf16-tp8-dp")) for n in names)  # no room
    assert not any(n.startswith("fp8-tp1-dp") for n in names)  # one B200 cannot hold FP8
    dp, single = plan.fit("nvfp4-tp4-dp2"), plan.fit("nvfp4-tp4")
    assert dp.fits
    assert dp.gpu_uuids == nvml.uuids_by_index
    # Two replicas: twice the KV cache and requests, one replica's longest context.
    assert dp.kv_tokens == 2 * (single.kv_tokens or 0)
    assert dp.requests_at_context == 2 * (single.requests_at_context or 0)
    assert dp.max_context == single.max_context
    # MTP first: FP8 on all eight GPUs keeps the MTP weights, NVFP4 ships none.
    assert plan.chosen == "fp8-tp8"
    # `step-station plan`'s table keeps its columns under the longer `-dpN` names.
    table = [line for line in render(plan).splitlines() if line.split(" ", 1)[0] in names]
    assert len(table) == len(names)
    assert (
        len({line.index(" yes ") if " yes " in line else line.index(" no ") for line in table}) == 1
    )


def test_a_data_parallel_profile_gets_every_replicas_gpus_and_the_seed_then_dp(
    station_home: Path,
) -> None:
    with simulated_host("b200", 8) as nvml:
        spec = launch_spec_for(_settings("nvfp4-tp4-dp2"), secrets=st.Secrets())
    assert spec.profile == "nvfp4-tp4-dp2"
    assert spec.gpus == tuple(nvml.uuids_by_index)
    assert sorted(_device_ids(spec)) == sorted(nvml.uuids_by_index)
    seed = seed_serve_commands()["stepfun-ai/Step-3.7-Flash-NVFP4 tp4"]
    _assert_seed_then_ours(spec, seed, ["--data-parallel-size", "2"])
    assert spec.arg_value("--tensor-parallel-size") == "4"  # per replica, as the seed says


def test_fp8_tp8_is_data_parallel_on_sixteen_gpus(station_home: Path) -> None:
    with simulated_host("h200", 16) as nvml:
        plan = planner.plan(hardware.detect())
        spec = launch_spec_for(_settings("auto"), secrets=st.Secrets())
    assert plan.fit("fp8-tp8-dp2").fits
    assert plan.chosen == spec.profile == "fp8-tp8-dp2"  # the most KV cache, MTP kept
    assert sorted(_device_ids(spec)) == sorted(nvml.uuids_by_index)
    _assert_seed_then_ours(
        spec,
        seed_serve_commands()["stepfun-ai/Step-3.7-Flash-FP8 tp8"],
        ["--data-parallel-size", "2"],
    )


def test_a_pinned_gpu_uuid_does_not_shrink_a_multi_gpu_profile(station_home: Path) -> None:
    with simulated_host("h200", 8) as nvml:
        pinned = nvml.uuids_by_index[3]
        spec = launch_spec_for(_settings("fp8-tp8", gpu_uuid=pinned), secrets=st.Secrets())
        one = launch_spec_for(_settings("fp8-tp1", gpu_uuid=pinned), secrets=st.Secrets())
    assert len(spec.gpus or ()) == 8
    assert one.gpus == (pinned,)  # one-GPU profiles keep the pin


def test_too_few_gpus_is_a_clear_error_not_a_smaller_request(station_home: Path) -> None:
    with simulated_host("b200", 4), pytest.raises(HardwareError) as err:
        launch_spec_for(_settings("fp8-tp8"), secrets=st.Secrets())
    assert "runs on 8 GPUs and this machine has 4" in str(err.value)
    with simulated_host("b200", 4), pytest.raises(HardwareError) as err:
        launch_spec_for(_settings("nvfp4-tp4-dp2"), secrets=st.Secrets())
    assert "runs on 8 GPUs" in str(err.value)


def test_data_parallel_names() -> None:
    dp = profiles.get_profile("fp8-tp1-dp4")
    assert (dp.data_parallel_size, dp.gpu_count, dp.min_gpus) == (4, 4, 4)
    assert dp.seed_flags == profiles.get_profile("fp8-tp1").seed_flags
    assert dp.seed_profile == "fp8-tp1"
    for bad in ("fp8-tp1-dp1", "fp8-tp1-dp0", "nope-dp2"):
        with pytest.raises(SettingsError):
            profiles.get_profile(bad)
