"""The control channel's data: a status crosses the socket unchanged; an error keeps its kind."""

from __future__ import annotations

from appliance import control
from appliance.engine.state import EngineState, EngineStatus, PhaseRecord
from appliance.errors import DockerUnavailableError, EngineError, PortInUseError, SettingsError


def test_a_status_crosses_the_socket_unchanged() -> None:
    status = EngineStatus(
        state=EngineState.STARTING,
        phase="Loading weights",
        phases=[PhaseRecord("Loading weights", 1.5, 2.25, False, "21/50 shards")],
        profile="fp8-tp1",
        container_id="abc",
        engine_url="http+unix://%2Fr%2Fengine.sock",
        progress=(5, 10),
        log_tail=["line"],
        started_at=1.0,
        notes=["n"],
        effective={"max_model_len": 4096},
        version=7,
    )
    assert control.status_from_dict(status.to_dict()) == status
    assert control.status_from_dict({}).state == EngineState.ABSENT


def test_an_error_from_the_service_keeps_its_kind_and_exit_code() -> None:
    for kind in (SettingsError, DockerUnavailableError, PortInUseError, EngineError):
        error = control._error_from(
            {"error": "what happened", "hint": "what to do", "exit_code": kind.exit_code}, 500
        )
        assert type(error).exit_code == kind.exit_code
        assert str(error) == "what happened what to do"
    assert isinstance(control._error_from({}, 502), EngineError)
