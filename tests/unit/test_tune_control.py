"""`step-station tune-moe` through the running service's control socket: the engine stopped
first (after the estimate, and only when confirmed), the tuner run at the GPU seam, the config
installed where the next engine start mounts it, `--status`, cancel, and the refusals. The
control server, the runner, the CLI and the launch spec are the real ones; the supervisor is a
stand-in that records `stop`, the tuner the fake of tests/fixtures/tune_kit.py."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fixtures.tune_kit import STEP37_FILE, UUID, FakeTuner

from appliance import control, moe_folder
from appliance import settings as st
from appliance.bench import tune
from appliance.bench.errors import TunedConfigError
from appliance.bench.tuning import TuneRunner, TuneTarget
from appliance.cli import main
from appliance.engine.launch import launch_spec_for
from appliance.engine.spec import hf_cache_root
from appliance.engine.state import EngineState, EngineStatus

DEADLINE_S = 30.0
DIGEST = "sha256:" + "b" * 64
CHECKPOINT = "stepfun-ai/Step-3.7-Flash-FP8"
# The checkpoint's config.json as the tuner-side reads it: Step-3.7's text_config and FP8 blocks.
CONFIG = {
    "architectures": ["Step3p7ForConditionalGeneration"],
    "text_config": {
        "moe_num_experts": 288,
        "moe_top_k": 8,
        "moe_intermediate_size": 1280,
        "intermediate_size": 11264,  # the dense layers': must not become N
        "hidden_size": 4096,
    },
    "quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128]},
}


class _Runtime:
    def __init__(self, kind: str = "docker") -> None:
        self.kind = kind

    def image_digest(self, ref: str) -> str:
        return DIGEST


class TuneSupervisor:
    """The part of the supervisor the tune routes use: its runtime, `stop`, `start` (which asks
    its start guards as Supervisor.try_start does; tests/unit/test_supervisor_races.py runs the
    real one against a tuning)."""

    def __init__(self, kind: str = "docker") -> None:
        self.runtime = _Runtime(kind)
        self.state = EngineState.READY
        self.calls: list[str] = []
        self.guards: list[Callable[[], Exception | None]] = []

    def status(self) -> EngineStatus:
        return EngineStatus(state=self.state, profile="fp8-tp1")

    def stop(self, timeout_s: float | None = None) -> EngineStatus:
        self.calls.append("stop")
        self.state = EngineState.STOPPED
        return self.status()

    def start(self, profile: str | None = None) -> EngineStatus:
        for guard in self.guards:
            refusal = guard()
            if refusal is not None:
                raise refusal
        self.calls.append("start")
        return self.status()


def _settings() -> st.Settings:
    return st.with_changes(st.Settings(), {"engine.profile": "fp8-tp1", "engine.gpu_uuid": UUID})


def _checkpoint(config: dict[str, Any] = CONFIG) -> Path:
    """The checkpoint's config.json where huggingface_hub keeps it (refs/main -> snapshot)."""
    repo = hf_cache_root(_settings().engine) / "hub" / ("models--" + CHECKPOINT.replace("/", "--"))
    snapshot = repo / "snapshots" / "abc123"
    snapshot.mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text("abc123")
    (snapshot / "config.json").write_text(json.dumps(config))
    return snapshot


class Service:
    def __init__(self, tuner: FakeTuner, kind: str = "docker") -> None:
        self.tuner = tuner
        self.targets: list[TuneTarget] = []
        self.supervisor = TuneSupervisor(kind)

        def launcher_for(target: TuneTarget) -> FakeTuner:
            self.targets.append(target)
            self.supervisor.calls.append("launch")
            return tuner

        self.runner = TuneRunner(launcher_for=launcher_for)
        self.supervisor.guards.append(self.runner.start_refusal)  # as appliance/server.py does
        self.server = control.ControlServer(
            self.supervisor,  # type: ignore[arg-type]
            st.SettingsStore(_settings()),
            tune=self.runner,
            gpu_name=lambda: "NVIDIA GB300",
        )


@pytest.fixture
def service() -> Iterator[Service]:
    _checkpoint()
    svc = Service(FakeTuner())
    svc.server.start()
    yield svc
    svc.server.stop()


def test_tune_moe_stops_the_engine_tunes_and_the_next_start_mounts_the_file(
    service: Service, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["tune-moe", "--yes", "--json", "--batch-sizes", "1", "16", "256"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    outcome = json.loads(captured.out)  # one JSON object on stdout
    assert outcome["state"] == "completed"
    assert outcome["file_name"] == STEP37_FILE
    # the estimate was said before the engine stopped, and the engine stopped before the tuner
    assert "The engine is stopped while tuning" in captured.err
    assert "3 batch sizes" in captured.err
    assert service.supervisor.calls == ["stop", "launch"]
    # the tuner got the engine's image by digest, its GPU, and Step-3.7's expert shape
    (target,) = service.targets
    assert (target.image_digest, target.gpu_uuid, target.gpu_name) == (DIGEST, UUID, "NVIDIA GB300")
    assert target.block_shape == (128, 128)
    assert target.request_gpu
    config = service.tuner.processes[0].config
    assert config["moe_intermediate_size"] == 1280  # not the dense 11264
    # installed in the persistent folder, in vLLM's format
    folder = tune.default_folder()
    assert sorted(tune.load_config(folder / STEP37_FILE)) == [1, 16, 256]
    # the next start: the setting and the read-only mount in the spec
    spec = launch_spec_for(_settings(), secrets=st.Secrets())
    assert spec.env_map[moe_folder.ENV_VAR] == "/opt/step-station/moe-configs"
    mount = next(m for m in spec.mounts if m.target == "/opt/step-station/moe-configs")
    assert (mount.source, mount.read_only) == (str(folder), True)

    assert main(["tune-moe", "--status", "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["running"] is None
    expected = status["configs"]["expected"]
    assert expected["file_name"] == STEP37_FILE
    assert expected["usable"]
    assert expected["batch_sizes"] == [1, 16, 256]
    assert expected["same_image"]
    assert main(["tune-moe", "--status"]) == 0
    assert f"Tuned: {STEP37_FILE}" in capsys.readouterr().out


def test_without_yes_and_nobody_to_ask_nothing_stops(
    service: Service, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("sys.stdin.isatty", lambda: False)
    assert main(["tune-moe", "--batch-sizes", "1"]) == TunedConfigError.exit_code
    err = capsys.readouterr().err
    assert "pass --yes" in err.lower()
    assert "The engine is stopped while tuning" in err  # the cost was still said
    assert service.supervisor.calls == []


def test_nvfp4_is_refused_and_the_engine_keeps_running(
    service: Service, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["tune-moe", "--yes", "--dtype", "nvfp4"]) == TunedConfigError.exit_code
    assert "NVFP4 cannot be tuned" in capsys.readouterr().err
    assert service.supervisor.calls == []


def test_a_start_is_refused_while_tuning_and_cancel_installs_nothing(
    capsys: pytest.CaptureFixture[str],
) -> None:
    _checkpoint()
    svc = Service(FakeTuner(hold=True))
    svc.server.start()
    try:
        remote = control.ServiceTune(control.ServiceClient(svc.server.path))  # type: ignore[arg-type]
        ended: list[Any] = []
        thread = threading.Thread(
            target=lambda: ended.append(remote.run(control.TuneRequest(batch_sizes=(1, 2)))),
            daemon=True,
        )
        thread.start()
        deadline = time.monotonic() + DEADLINE_S
        while not svc.tuner.processes:
            assert time.monotonic() < deadline, "the tuner never started"
            time.sleep(0.02)
        status = remote.status()
        assert status["running"]["total"] == 2
        data, line = control.tune_status(svc.runner)
        assert data is not None
        assert line.startswith("MoE tuning running (the engine is stopped meanwhile): ")
        assert "/2 batch sizes" in line
        # the engine may not come back under the tuner
        assert main(["start"]) != 0
        assert "MoE tuning is running" in capsys.readouterr().err
        assert "start" not in svc.supervisor.calls
        assert remote.cancel()
        thread.join(DEADLINE_S)
        assert ended[0].state == "cancelled"
        assert not (tune.default_folder() / STEP37_FILE).exists()
        assert remote.status()["running"] is None
        assert control.tune_status(svc.runner) == (None, "")
    finally:
        svc.server.stop()


def test_the_process_engine_and_a_non_fp8_checkpoint_are_clear_errors(
    capsys: pytest.CaptureFixture[str],
) -> None:
    _checkpoint()
    sup = TuneSupervisor(kind="process")
    with pytest.raises(TunedConfigError, match="runs as a process"):
        control.tune_target(sup, _settings(), "NVIDIA GB300")  # type: ignore[arg-type]
    _checkpoint(CONFIG | {"quantization_config": {"quant_method": "modelopt"}})
    with pytest.raises(TunedConfigError, match="not the FP8 one"):
        control.tune_target(TuneSupervisor(), _settings(), "NVIDIA GB300")  # type: ignore[arg-type]


def test_a_checkpoint_not_yet_downloaded_says_start_it_once() -> None:
    with pytest.raises(TunedConfigError, match="not on this machine yet"):
        control.tune_target(TuneSupervisor(), _settings(), "NVIDIA GB300")  # type: ignore[arg-type]
