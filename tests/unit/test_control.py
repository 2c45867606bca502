"""The control channel: a status crosses the socket unchanged; an error keeps its kind; and with a
service listening, `config set`, `keys` and `pull` go to it (its settings store, key store and
runtime), without one the CLI does them itself."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from fixtures.fake_runtime import FakeRuntime

from appliance import control
from appliance import settings as st
from appliance.cli import main
from appliance.engine.runtime import ProgressCallback
from appliance.engine.spec import LaunchSpec
from appliance.engine.state import EngineState, EngineStatus, PhaseRecord
from appliance.errors import (
    ApplianceError,
    BadInputError,
    DockerUnavailableError,
    EngineError,
    ImagePullError,
    PortInUseError,
    SettingsError,
)
from appliance.keys import KeyStore


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


# ---------------------------------------------------------------- the service's end, in-process


class PullingRuntime(FakeRuntime):
    """A Docker-like runtime whose pull reports three progress steps, or fails as Docker can."""

    kind = "docker"

    def __init__(self, error: ApplianceError | None = None) -> None:
        super().__init__()
        self.error = error
        self.pulled: list[str] = []

    def ensure_image(self, spec: LaunchSpec, on_progress: ProgressCallback) -> None:
        self.pulled.append(spec.image)
        for done in (0, 500_000_000, 1_000_000_000):
            on_progress(done, 1_000_000_000, "Downloading")
        if self.error is not None:
            raise self.error


class FakeSupervisor:
    """The part of the supervisor the control routes use; takes settings as the real one does
    (a running engine then needs a restart for an engine setting)."""

    def __init__(self, settings: st.Settings, runtime: FakeRuntime | None = None) -> None:
        self.started_with = settings.engine
        self.settings = settings
        self.runtime = runtime or PullingRuntime()
        self.applied: list[st.Settings] = []

    def apply_settings(self, settings: st.Settings) -> EngineStatus:
        self.settings = settings
        self.applied.append(settings)
        return self.status()

    def status(self) -> EngineStatus:
        return EngineStatus(
            state=EngineState.READY, restart_needed=self.settings.engine != self.started_with
        )


@pytest.fixture
def service() -> Iterator[tuple[FakeSupervisor, st.SettingsStore, KeyStore]]:
    """A ControlServer as `step-station up` runs it: a store the supervisor follows, and a key
    store at a path of its own (so a key the CLI made can only have come through the socket)."""
    store = st.SettingsStore(st.Settings())
    supervisor = FakeSupervisor(store.current())
    store.subscribe(supervisor.apply_settings)
    keys = KeyStore(st.data_dir() / "service-keys.json")
    server = control.ControlServer(supervisor, store, keys=keys)
    server.start()
    yield supervisor, store, keys
    server.stop()


def test_config_set_goes_to_the_running_service(service, capsys) -> None:
    supervisor, store, _ = service
    assert main(["config", "set", "gateway.max_body_mb", "3"]) == 0
    out = capsys.readouterr().out
    assert "gateway.max_body_mb = 3" in out
    assert "the running service uses it now" in out
    assert "restart" not in out  # not an engine setting
    assert store.current().gateway.max_body_mb == 3  # in force in the service
    assert supervisor.applied[-1].gateway.max_body_mb == 3  # its parts were told at once
    assert st.load_settings().settings.gateway.max_body_mb == 3  # and saved
    # an engine setting: the running engine must restart for it, and the command says so
    assert main(["config", "set", "engine.max_model_len", "65536"]) == 0
    assert "`step-station restart` applies" in capsys.readouterr().out
    assert supervisor.settings.engine.max_model_len == 65536


def test_a_bad_config_set_comes_back_as_the_same_error_and_saves_nothing(service, capsys) -> None:
    supervisor, store, _ = service
    assert main(["config", "set", "engine.port", "eighty"]) == SettingsError.exit_code
    err = capsys.readouterr().err
    assert "engine.port" in err
    assert "config set engine.port VALUE" in err  # what to do, from the service
    assert main(["config", "set", "engine.nope", "1"]) == SettingsError.exit_code
    assert "Unknown setting 'engine.nope'" in capsys.readouterr().err
    assert not store.path.exists()
    assert supervisor.applied == []
    assert store.current() == st.Settings()


def test_keys_go_to_the_services_key_store(service, capsys) -> None:
    _, _, keys = service
    assert main(["keys", "create", "alice"]) == 0
    secret = capsys.readouterr().out.strip()
    assert keys.verify(secret) is not None  # made in the service's store
    assert not (st.data_dir() / "keys.json").exists()  # not in the file the CLI alone uses
    assert main(["keys", "list", "--json"]) == 0
    (listed,) = json.loads(capsys.readouterr().out)
    assert (listed["name"], listed["active"]) == ("alice", True)
    assert main(["keys", "revoke", "alice"]) == 0
    assert "Revoked 'alice'" in capsys.readouterr().out
    assert keys.verify(secret) is None  # refused by the service's store at once
    assert main(["keys", "list"]) == 0
    assert "revoked" in capsys.readouterr().out
    # errors keep their kind, message and hint
    assert main(["keys", "revoke", "bob"]) == BadInputError.exit_code
    err = capsys.readouterr().err
    assert "No active key is named or has the id 'bob'" in err
    assert "Active keys: none" in err


def test_pull_goes_to_the_services_runtime(service, capsys) -> None:
    supervisor, store, _ = service
    assert main(["pull"]) == 0
    out = capsys.readouterr().out
    assert supervisor.runtime.pulled == [store.current().engine.image]
    assert f"Pulled {store.current().engine.image} (953.7 MiB downloaded)." in out
    assert "100%" in out  # the service's progress reached the terminal


def test_a_failed_pull_in_the_service_is_the_clis_error(service, capsys) -> None:
    supervisor, _, _ = service
    supervisor.runtime = PullingRuntime(ImagePullError("manifest unknown", hint="Check the tag."))
    assert main(["pull"]) == ImagePullError.exit_code
    assert "manifest unknown Check the tag." in capsys.readouterr().err


def test_pull_without_docker_in_the_service_says_so(service, capsys) -> None:
    supervisor, _, _ = service
    supervisor.runtime = FakeRuntime()  # a process runtime: no image
    assert main(["pull"]) == 0
    assert capsys.readouterr().out.strip() == control.NO_IMAGE


def test_the_service_reports_its_settings_and_unknown_routes(service) -> None:
    _, store, _ = service
    store.update({"chat.temperature": 0.25})
    client = control.running_service()
    assert client is not None
    data = client._call("GET", "/settings")
    assert data["settings"]["chat"]["temperature"] == pytest.approx(0.25)
    assert data["path"] == str(store.path)
    with pytest.raises(ApplianceError, match="no /nowhere here") as caught:
        client._call("GET", "/nowhere")
    assert type(caught.value) is ApplianceError  # exit code 1, as the service said
    with pytest.raises(SettingsError, match="changes"):
        client._call("POST", "/settings", {"changes": "engine.port=1"})


def test_without_a_service_the_cli_does_it_itself(capsys) -> None:
    assert control.running_service() is None
    assert main(["config", "set", "gateway.max_body_mb", "5"]) == 0
    assert "running service" not in capsys.readouterr().out
    assert st.load_settings().settings.gateway.max_body_mb == 5
    assert main(["keys", "create", "carol"]) == 0
    secret = capsys.readouterr().out.strip()
    assert KeyStore().verify(secret) is not None  # the key file itself
