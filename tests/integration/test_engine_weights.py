"""Weights through the real huggingface_hub code path, against a small hub served by the test
(`HF_ENDPOINT`): cache layout, byte progress, resume, disk check, gated/missing/bad token."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from engine_hub import FakeHub, Repo
from fixtures.sim import free_port

from appliance import settings as st
from appliance.engine import EngineState, Supervisor
from appliance.engine.weights import ensure_weights, repo_folder
from appliance.errors import WeightsError

pytestmark = pytest.mark.timeout(120)
REPO = "stepfun-ai/Step-3.7-Flash-FP8"


def _files(big: int = 600_000) -> dict[str, bytes]:
    return {
        "config.json": b'{"architectures": ["Step3p7ForConditionalGeneration"]}',
        "model-00001-of-00002.safetensors": os.urandom(big),
        "model-00002-of-00002.safetensors": os.urandom(400_000),
    }


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch):
    server = FakeHub().start()
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    yield server
    server.close()


def test_download_into_the_cache_with_byte_progress(hub: FakeHub, tmp_path: Path) -> None:
    # huggingface_hub writes in 10 MiB chunks: a 25 MB shard at 15 MB/s shows bytes in between
    files = _files(big=25_000_000)
    hub.repos[REPO] = Repo(files=files, bytes_per_s=15_000_000)
    seen: list[tuple[int, int]] = []
    snapshot = ensure_weights(
        REPO, hf_cache=tmp_path, on_progress=lambda d, t, line: seen.append((d, t))
    )
    total = sum(len(b) for b in files.values())
    assert snapshot == repo_folder(tmp_path, REPO) / "snapshots" / hub.repos[REPO].sha
    for name, data in files.items():
        assert (snapshot / name).read_bytes() == data
    # the engine resolves "main" offline through refs/main
    assert (repo_folder(tmp_path, REPO) / "refs" / "main").read_text() == hub.repos[REPO].sha
    assert all(t == total for _, t in seen)
    assert seen[-1] == (total, total)
    assert any(0 < d < total for d, _ in seen)  # it moved in between, not only at the ends
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)
    # complete: a second call downloads nothing
    before = len(hub.gets())
    ensure_weights(REPO, hf_cache=tmp_path)
    assert len(hub.gets()) == before


def test_interrupted_download_resumes_where_it_stopped(hub: FakeHub, tmp_path: Path) -> None:
    files = _files(big=12_000_000)  # more than huggingface_hub's 10 MiB write chunk
    big = "model-00001-of-00002.safetensors"
    hub.repos[REPO] = Repo(files=files, cut_after=11_000_000)
    # huggingface_hub resumes a cut transfer itself (from the .incomplete blob); an error left
    # for us would resume the same way on the next call
    ensure_weights(REPO, hf_cache=tmp_path)
    snapshot = repo_folder(tmp_path, REPO) / "snapshots" / hub.repos[REPO].sha
    assert (snapshot / big).read_bytes() == files[big]
    ranges = [r for _, _, r in hub.gets(big) if r]
    assert ranges, "the second request for the cut file asked only for the rest"
    assert int(ranges[-1][6:].split("-")[0]) == 10 * 1024 * 1024  # the bytes already on disk
    assert hub.bytes_served < 2 * len(files[big])


def test_disk_too_small_is_refused_before_downloading(hub: FakeHub, tmp_path: Path) -> None:
    hub.repos[REPO] = Repo(files=_files(), claimed_sizes={"config.json": 50 * 10**15})
    with pytest.raises(WeightsError) as info:
        ensure_weights(REPO, hf_cache=tmp_path)
    text = str(info.value)
    assert "Not enough disk space" in text
    assert "44.4 PiB more is needed" in text  # 50e15 bytes
    assert str(tmp_path) in text
    assert "engine.hf_cache_dir" in text
    assert hub.gets() == []  # nothing was fetched


def test_gated_missing_and_bad_token_say_what_to_do(hub: FakeHub, tmp_path: Path) -> None:
    hub.repos["org/gated"] = Repo(files=_files(), gated=True)
    hub.repos["org/private"] = Repo(files=_files(), token="hf_right")
    with pytest.raises(WeightsError, match="gated") as gated:
        ensure_weights("org/gated", hf_cache=tmp_path, token="hf_any")
    assert "https://huggingface.co/org/gated" in str(gated.value)
    with pytest.raises(WeightsError, match="not found") as missing:
        ensure_weights("org/nothing", hf_cache=tmp_path)
    assert "no Hugging Face token is set" in str(missing.value)
    with pytest.raises(WeightsError, match="refused the token"):
        ensure_weights("org/private", hf_cache=tmp_path, token="hf_wrong")
    path = ensure_weights("org/private", hf_cache=tmp_path, token="hf_right")
    assert (path / "config.json").exists()


def test_hub_unreachable(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens on discard
    with pytest.raises(WeightsError, match="Cannot reach the Hugging Face Hub"):
        ensure_weights(REPO, hf_cache=tmp_path)


def test_supervisor_downloads_then_starts_offline(
    hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The start goes through DOWNLOADING_WEIGHTS with byte progress, then runs offline."""
    files = _files()
    hub.repos[REPO] = Repo(files=files, bytes_per_s=1_000_000)
    monkeypatch.setenv("STEP_SIM_LOAD_S", "1")
    settings = st.with_changes(
        st.Settings(),
        {
            "engine.port": free_port(),
            "engine.profile": "fp8-tp1",
            "engine.hf_cache_dir": str(tmp_path / "hf"),
        },
    )
    sup = Supervisor.for_demo(settings, download_weights=True, poll_interval_s=0.1)
    states: list[tuple[EngineState, tuple[int, int] | None]] = []
    sup.add_listener(lambda s: states.append((s.state, s.progress)))
    try:
        sup.start()
        status = sup.wait_ready(60)
        downloading = [p for s, p in states if s == EngineState.DOWNLOADING_WEIGHTS and p]
        total = sum(len(b) for b in files.values())
        assert downloading[-1] == (total, total)
        assert status.phases[0].name == "Downloading weights"
        assert status.phases[0].done
        handle = sup.runtime.find(settings.engine.container_name)
        assert handle is not None
        env = (Path(f"/proc/{handle.id.split(':')[1]}/environ")).read_bytes().split(b"\0")
        assert b"HF_HUB_OFFLINE=1" in env
        assert f"HF_HOME={tmp_path / 'hf'}".encode() in env
    finally:
        sup.stop()
