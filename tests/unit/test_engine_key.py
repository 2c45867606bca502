"""The per-start engine key: private files, never in the container's env/command/labels, recovered
on adoption; the HF token only for an engine that downloads itself."""

from __future__ import annotations

import stat
from pathlib import Path

from appliance import settings as st
from appliance.engine import engine_key
from appliance.engine.docker_runtime import container_kwargs
from appliance.engine.launch import launch_spec_for, with_fresh_engine_key
from appliance.engine.spec import ENGINE_KEY_DIR, LABEL_ENGINE_KEY_ID, listen_host


def _settings(**engine: object) -> st.Settings:
    base = {"engine.profile": "fp8-tp1", "engine.request_gpu": False}
    return st.with_changes(st.Settings(), base | {f"engine.{k}": v for k, v in engine.items()})


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_fresh_private_key_per_start_and_old_ones_pruned(station_home: Path) -> None:
    first = engine_key.issue("eng")
    second = engine_key.issue("eng")
    assert first.secret != second.secret
    assert first.secret not in repr(first)
    assert not first.folder.exists()  # an earlier start's key goes with the next start
    key_file = second.folder / engine_key.KEY_FILE
    assert key_file.read_text().strip() == second.secret
    assert _mode(key_file) == 0o600
    for folder in (second.folder, second.folder.parent, second.folder.parent.parent):
        assert _mode(folder) == 0o700
    assert str(second.folder).startswith(str(station_home))
    labels = {LABEL_ENGINE_KEY_ID: second.id}
    assert engine_key.recover("eng", labels) == second.secret
    engine_key.discard("eng", labels)
    assert not second.folder.exists()
    assert engine_key.recover("eng", labels) is None  # keyed, but the file is gone
    assert engine_key.recover("eng", {}) == ""  # an engine started without a key
    assert engine_key.recover("eng", {LABEL_ENGINE_KEY_ID: "../../etc"}) is None


def test_docker_engine_gets_its_key_through_a_read_only_folder_only(station_home: Path) -> None:
    spec = launch_spec_for(_settings(), secrets=st.Secrets(hf_token="hf_tok"))
    spec = with_fresh_engine_key(spec.with_env(HF_HUB_OFFLINE="1"))
    kwargs = container_kwargs(spec, image_entrypoint=["vllm", "serve"])
    shown = repr({k: kwargs[k] for k in ("command", "environment", "labels", "entrypoint")})
    assert spec.engine_key
    assert spec.engine_key not in shown
    assert "hf_tok" not in shown
    assert kwargs["network_mode"] == "none"  # vLLM is on its socket; nothing to reach
    assert "ports" not in kwargs
    assert kwargs["command"] == list(spec.args)
    assert kwargs["entrypoint"][:2] == ["/bin/sh", "-c"]
    assert kwargs["entrypoint"][2].startswith("umask 007; ")  # the owner's group may connect
    (sock,) = [m for m in kwargs["mounts"] if m["Target"] == "/run/step-station-socket"]
    assert not sock["ReadOnly"]
    assert sock["Source"] == spec.socket_dir
    assert kwargs["entrypoint"][-2:] == ["vllm", "serve"]
    (mount,) = [m for m in kwargs["mounts"] if m["Target"] == ENGINE_KEY_DIR]
    assert mount["ReadOnly"]
    assert Path(mount["Source"], engine_key.KEY_FILE).read_text().strip() == spec.engine_key
    # the appliance downloaded the weights: no token file for the engine
    assert not Path(mount["Source"], engine_key.HF_TOKEN_FILE).exists()


def test_hf_token_only_when_the_engine_downloads_itself(station_home: Path) -> None:
    secrets = st.Secrets(hf_token="hf_tok")
    own = launch_spec_for(_settings(), secrets=secrets, download_weights=False)
    assert own.engine_fetches_weights
    keyed = with_fresh_engine_key(own)
    assert Path(keyed.engine_key_dir, engine_key.HF_TOKEN_FILE).read_text().strip() == "hf_tok"
    assert "HF_TOKEN" not in container_kwargs(keyed, ["vllm", "serve"])["environment"]
    process = launch_spec_for(
        _settings(runtime="process"), secrets=secrets, demo=True, download_weights=False
    )
    process = with_fresh_engine_key(process)
    assert process.env_map["VLLM_API_KEY"] == process.engine_key
    assert process.env_map["HF_TOKEN"] == "hf_tok"
    assert process.engine_key not in process.display_command()
    offline = with_fresh_engine_key(process.with_env(HF_HUB_OFFLINE="1"))
    assert "HF_TOKEN" not in offline.env_map


def test_the_engine_never_listens_beyond_loopback() -> None:
    settings = _settings()
    for host in ("0.0.0.0", "192.168.1.5", "::"):
        settings = st.with_changes(settings, {"engine.host": host})
        assert listen_host(settings.engine, "docker") == "127.0.0.1"
    settings = st.with_changes(settings, {"engine.host": "127.0.0.1"})
    assert listen_host(settings.engine, "process") == "127.0.0.1"
