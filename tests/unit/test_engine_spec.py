"""The launch spec as data: GPU by UUID, the engine's socket (or loopback port), mounts, env,
labels, settings hash."""

from __future__ import annotations

import json
import os
import shutil
import stat
import tempfile
from pathlib import Path

import pytest

from appliance import endpoint, moe_folder, profiles
from appliance import settings as st
from appliance.engine import phases
from appliance.engine.launch import launch_spec_for
from appliance.engine.spec import (
    LABEL_MANAGED,
    LABEL_NAME,
    LABEL_PROFILE,
    LABEL_SETTINGS_HASH,
    build_launch_spec,
    listen_host,
    safer_spec,
)
from appliance.errors import EngineError

UUID = "GPU-6f1c0e9b-1111-2222-3333-444455556666"


def _settings(**engine: object) -> st.Settings:
    base = {"engine.profile": "fp8-tp1", "engine.gpu_uuid": UUID}
    return st.with_changes(st.Settings(), base | {f"engine.{k}": v for k, v in engine.items()})


def test_docker_spec_for_the_station_profile(station_home: Path) -> None:
    settings = _settings(port=8123)
    secrets = st.Secrets(hf_token="hf_secret_value")
    spec = launch_spec_for(settings, secrets=secrets)
    prof = profiles.get_profile("fp8-tp1")
    assert spec.args[0] == prof.checkpoint
    seed = profiles.build_vllm_args(prof, settings.engine, uds=endpoint.CONTAINER_SOCKET)
    assert list(spec.args) == [*seed, "--allowed-origins", "[]"]  # vLLM 0.23 allows every origin
    # vLLM serves on the Unix socket in the private folder mounted into the container, not on a
    # port; the container has no network at all (the appliance downloads the weights first)
    assert spec.arg_value("--uds") == "/run/step-station-socket/engine.sock"
    assert spec.arg_value("--host") is None
    assert spec.arg_value("--port") is None
    socket_dir = endpoint.socket_dir(settings.engine.container_name)
    assert spec.socket_dir == str(socket_dir)
    assert spec.engine_url == endpoint.socket_url(socket_dir / "engine.sock")
    assert endpoint.split(spec.engine_url)[0] == str(socket_dir / "engine.sock")
    assert spec.network_mode == ""
    assert spec.container_network == "none"
    assert spec.with_env(HF_HUB_OFFLINE="1").container_network == "none"
    assert spec.gpus == (UUID,)
    assert spec.ipc_mode == "host"
    assert ("memlock", -1, -1) in spec.ulimits
    assert ("stack", 67108864, 67108864) in spec.ulimits
    targets = {m.target: m.source for m in spec.mounts}
    assert set(targets) == {
        "/root/.cache/huggingface",
        "/root/.cache/vllm",
        "/root/.cache/flashinfer",
        "/root/.triton",
        "/run/step-station-socket",
    }
    assert targets["/root/.cache/huggingface"] == str(station_home / "cache" / "huggingface")
    assert targets.pop("/run/step-station-socket") == str(socket_dir)
    assert all(src.startswith(str(station_home)) for src in targets.values())
    labels = spec.label_map
    assert labels[LABEL_MANAGED] == "true"
    assert labels[LABEL_NAME] == "step-station-engine"
    assert labels[LABEL_PROFILE] == "fp8-tp1"
    assert labels[LABEL_SETTINGS_HASH] == spec.settings_hash
    # the appliance downloads with the token; the engine (offline) never gets it; not in the
    # plain env, the labels or the repr
    assert spec.hf_token == "hf_secret_value"
    assert "HF_TOKEN" not in spec.env_map
    assert not spec.engine_fetches_weights
    assert "hf_secret_value" not in repr(spec)
    assert spec.weights_repo == prof.checkpoint


def test_docker_spec_on_tcp_keeps_vllm_on_the_hosts_loopback(station_home: Path) -> None:
    spec = launch_spec_for(_settings(port=8123, listen="tcp"), secrets=st.Secrets())
    # the container shares the host's network and vLLM listens on its loopback only: nothing is
    # published through Docker's NAT, no other container can reach it
    assert spec.network_mode == "host" == spec.container_network
    assert spec.arg_value("--host") == "127.0.0.1"
    assert spec.arg_value("--uds") is None
    assert (spec.host_ip, spec.host_port, spec.container_port) == ("127.0.0.1", 8123, 8123)
    assert spec.engine_url == "http://127.0.0.1:8123"
    assert spec.socket_dir == ""
    assert "/run/step-station-socket" not in {m.target for m in spec.mounts}


def test_an_engine_that_downloads_itself_gets_the_bridge_with_nothing_published() -> None:
    spec = launch_spec_for(_settings(), secrets=st.Secrets(), download_weights=False)
    assert spec.engine_fetches_weights
    assert spec.container_network == "bridge"


def test_a_long_data_path_puts_the_socket_in_a_private_tmp_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    monkeypatch.setenv("STEP_STATION_HOME", str(deep))
    path = endpoint.prepare_socket("engine")
    assert len(str(path)) <= endpoint.MAX_SOCKET_PATH  # a socket address holds 107 bytes
    assert path.parent.parent == Path(f"/tmp/step-station-{os.getuid()}")
    assert stat.S_IMODE(path.parent.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o2700
    assert endpoint.prepare_socket("engine") == path  # the same folder every time
    short = Path(tempfile.mkdtemp(prefix="ss-", dir="/tmp"))
    try:
        monkeypatch.setenv("STEP_STATION_HOME", str(short))
        assert endpoint.socket_path("engine").is_relative_to(short)  # under the data dir
    finally:
        shutil.rmtree(short)


def test_a_socket_folder_of_another_account_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Someone else made the folder first (in /tmp anyone can): it is not used."""
    monkeypatch.setenv("STEP_STATION_HOME", str(tmp_path))
    folder = endpoint.socket_dir("engine")
    folder.mkdir(parents=True)
    os.chown(folder, 65534, 65534)
    with pytest.raises(EngineError, match="not a folder of this account"):
        endpoint.prepare_socket("engine")
    folder.rmdir()
    folder.symlink_to(tmp_path)  # nor a symlink to somewhere else
    with pytest.raises(EngineError, match="not a folder of this account"):
        endpoint.prepare_socket("engine")


def test_no_gpu_request_when_turned_off() -> None:
    spec = launch_spec_for(_settings(request_gpu=False), secrets=st.Secrets())
    assert spec.gpus is None
    assert spec.ulimits == ()  # pinned-memory limits only matter with a GPU


def test_all_gpus_when_no_uuid_is_known() -> None:
    settings = _settings()
    prof = profiles.get_profile("fp8-tp1")
    spec = build_launch_spec(
        settings.engine.__class__(profile="fp8-tp1"),
        profile=prof.name,
        served_model_name=prof.served_model_name,
        vllm_args=["m"],
    )
    assert spec.gpus == ()


def test_process_runtime_listens_on_loopback_and_shares_the_hf_cache(station_home: Path) -> None:
    settings = _settings(runtime="process")
    assert listen_host(settings.engine, "process") == "127.0.0.1"
    spec = launch_spec_for(settings, demo=True, download_weights=False, secrets=st.Secrets())
    # as a local process, vLLM is given the host's socket path itself
    assert spec.arg_value("--uds") == str(endpoint.socket_path(settings.engine.container_name))
    assert spec.arg_value("--host") is None
    settings = st.with_changes(settings, {"engine.listen": "tcp"})
    on_tcp = launch_spec_for(settings, demo=True, download_weights=False, secrets=st.Secrets())
    assert on_tcp.arg_value("--host") == "127.0.0.1"
    assert spec.mounts == ()
    assert spec.gpus is None
    assert spec.executable[1:] == ("-m", "appliance.simulator")
    assert dict(spec.env)["HF_HOME"] == str(station_home / "cache" / "huggingface")
    assert spec.weights_repo == ""


def test_local_model_is_mounted_read_only_and_not_downloaded(tmp_path: Path) -> None:
    model = tmp_path / "my-checkpoint"
    model.mkdir()
    spec = launch_spec_for(_settings(model_override=str(model)), secrets=st.Secrets())
    assert spec.args[0] == "/models/my-checkpoint"
    mount = next(m for m in spec.mounts if m.target == "/models/my-checkpoint")
    assert mount.source == str(model)
    assert mount.read_only
    assert spec.weights_repo == ""


def test_settings_hash_follows_what_runs_not_secrets_or_sim_knobs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    base = launch_spec_for(_settings(), secrets=st.Secrets()).settings_hash
    assert launch_spec_for(_settings(), secrets=st.Secrets(hf_token="x")).settings_hash == base
    monkeypatch.setenv("STEP_SIM_LOAD_S", "9")
    with_knob = launch_spec_for(_settings(), secrets=st.Secrets())
    assert with_knob.settings_hash == base
    assert with_knob.env_map["STEP_SIM_LOAD_S"] == "9"  # passed through to the engine
    changes: list[dict[str, object]] = [
        {"max_model_len": 65536},
        {"image": "other:1"},
        {"listen": "tcp"},
    ]
    for change in changes:
        assert launch_spec_for(_settings(**change), secrets=st.Secrets()).settings_hash != base
    # the port matters only on TCP
    assert launch_spec_for(_settings(port=9001), secrets=st.Secrets()).settings_hash == base
    tcp = launch_spec_for(_settings(listen="tcp"), secrets=st.Secrets()).settings_hash
    assert (
        launch_spec_for(_settings(listen="tcp", port=9001), secrets=st.Secrets()).settings_hash
        != tcp
    )
    other_profile = st.with_changes(_settings(), {"engine.profile": "nvfp4-tp1"})
    assert launch_spec_for(other_profile, secrets=st.Secrets()).settings_hash != base


def test_safer_spec_lowers_memory_then_gives_up() -> None:
    spec = launch_spec_for(_settings(), secrets=st.Secrets())
    safer, note = safer_spec(spec, phases.CUDA_OOM) or (None, "")
    assert safer is not None
    assert safer.arg_value("--gpu-memory-utilization") == "0.90"
    assert note == "--gpu-memory-utilization 0.90 (was 0.95)"
    assert safer.settings_hash == spec.settings_hash  # still "the same settings" for restarts
    low = spec.with_arg("--gpu-memory-utilization", "0.50")
    assert safer_spec(low, phases.CUDA_OOM) is None


def test_safer_spec_for_a_context_that_does_not_fit() -> None:
    spec = launch_spec_for(_settings(max_model_len=200000), secrets=st.Secrets())
    halved, note = safer_spec(spec, phases.MAX_LEN_TOO_LARGE) or (None, "")
    assert halved is not None
    assert halved.arg_value("--max-model-len") == "100000"
    assert note == "--max-model-len 100000 (was 200000)"
    facts = {"estimated_max_model_len": 129536, "model_max_len": 262144}
    plain = launch_spec_for(_settings(), secrets=st.Secrets())
    estimated, note = safer_spec(plain, phases.MAX_LEN_TOO_LARGE, facts) or (None, "")
    assert estimated is not None
    assert estimated.arg_value("--max-model-len") == "129024"
    assert note == "--max-model-len 129024 (was 262144)"


# ------------------------------------------------------------------ tuned MoE configs (issue 14)

SHIPPED_MOE = Path(__file__).resolve().parents[1] / "data" / "moe_configs"
B200_CONFIG = "E=128,N=384,device_name=NVIDIA_B200,dtype=fp8_w8a8,block_shape=[128,128].json"


def _tuned_folder(station_home: Path) -> Path:
    folder = station_home / "data" / "moe-configs"
    assert folder == moe_folder.default_folder()
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def test_a_start_mounts_the_tuned_configs_read_only_and_sets_vllms_folder(
    station_home: Path,
) -> None:
    folder = _tuned_folder(station_home)
    # a config vLLM shipped (0.32), in its own name and format
    shutil.copy(SHIPPED_MOE / B200_CONFIG, folder / B200_CONFIG)
    spec = launch_spec_for(_settings(), secrets=st.Secrets())
    assert spec.env_map["VLLM_TUNED_CONFIG_FOLDER"] == "/opt/step-station/moe-configs"
    (mount,) = [m for m in spec.mounts if m.target == "/opt/step-station/moe-configs"]
    assert mount.source == str(folder)
    assert mount.read_only
    # the setting is in the hashed env: an engine started before tuning needs a restart
    before = launch_spec_for(_settings(), secrets=st.Secrets(), profile=None)
    (folder / B200_CONFIG).unlink()
    after = launch_spec_for(_settings(), secrets=st.Secrets())
    assert before.settings_hash != after.settings_hash


def test_no_setting_and_no_mount_without_configs(station_home: Path) -> None:
    # no folder, an empty folder, a folder of files vLLM never looks for
    for _ in range(3):
        spec = launch_spec_for(_settings(), secrets=st.Secrets())
        assert "VLLM_TUNED_CONFIG_FOLDER" not in spec.env_map
        assert "/opt/step-station/moe-configs" not in {m.target for m in spec.mounts}
        folder = _tuned_folder(station_home)
        (folder / "notes.json").write_text("{}")


def test_a_broken_config_leaves_the_folder_out_rather_than_crash_the_load(
    station_home: Path,
) -> None:
    folder = _tuned_folder(station_home)
    shutil.copy(SHIPPED_MOE / B200_CONFIG, folder / B200_CONFIG)
    # vLLM's get_moe_configs does int(key) on every key but triton_version, unguarded
    broken = "E=288,N=1280,device_name=NVIDIA_GB300,dtype=fp8_w8a8,block_shape=[128,128].json"
    (folder / broken).write_text(json.dumps({"triton_version": "3.5.0", "best": {}}))
    spec = launch_spec_for(_settings(), secrets=st.Secrets())
    assert "VLLM_TUNED_CONFIG_FOLDER" not in spec.env_map
    assert "/opt/step-station/moe-configs" not in {m.target for m in spec.mounts}


def test_an_engine_on_the_host_reads_the_folder_in_place(station_home: Path) -> None:
    folder = _tuned_folder(station_home)
    shutil.copy(SHIPPED_MOE / B200_CONFIG, folder / B200_CONFIG)
    settings = _settings(runtime="process")
    spec = launch_spec_for(settings, demo=True, download_weights=False, secrets=st.Secrets())
    assert spec.env_map["VLLM_TUNED_CONFIG_FOLDER"] == str(folder)
    assert spec.mounts == ()
