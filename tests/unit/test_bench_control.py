"""`step-station bench` through the running service's control socket: the run, its progress and
result as the CLI prints them, the runs list, cancel, one run at a time, the status's `bench` key;
and without a service, the CLI's clear answers. The engine and `vllm` are the stand-ins of
tests/fixtures/bench_kit.py; the control server, the runner and the store are the real ones."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fixtures.bench_kit import (
    DEADLINE_S,
    MODEL,
    WINDOW,
    Engine,
    engine_socket,
    fake_log,
    fake_vllm,
    wait_for,
)

from appliance import control, endpoint
from appliance import settings as st
from appliance.bench.errors import BenchError
from appliance.bench.runner import BenchRequest, BenchRunner
from appliance.bench.store import BenchStore
from appliance.cli import main
from appliance.engine.state import EngineState, EngineStatus

__all__ = ["engine_socket", "fake_vllm"]  # fixtures, used by name


@dataclass
class _Runtime:
    kind: str = "process"


class BenchSupervisor:
    """The part of the supervisor `bench_target` reads: a ready engine on its socket."""

    def __init__(self, url: str, program: Path, state: EngineState = EngineState.READY) -> None:
        self.engine_url = url
        self.engine_api_key = Engine.key
        self.served_model_name = "step3p7-flash"
        self.runtime = _Runtime()
        self.state = state
        self.program = program
        self.settings = st.Settings()

    def status(self) -> EngineStatus:
        return EngineStatus(
            state=self.state,
            profile="fp8-tp1",
            effective={"command": [str(self.program), "serve", MODEL], "model": MODEL},
        )


@pytest.fixture
def service(engine_socket: str, fake_vllm: Path) -> Iterator[tuple[BenchSupervisor, BenchRunner]]:
    store = st.SettingsStore(st.Settings())
    supervisor = BenchSupervisor(endpoint.socket_url(engine_socket), fake_vllm)
    bench = BenchRunner(BenchStore(st.data_dir() / "service-bench.sqlite3"))
    server = control.ControlServer(supervisor, store, bench=bench, gpu_name=lambda: "NVIDIA GB300")
    server.start()
    yield supervisor, bench
    server.stop()
    bench.store.close()


def test_bench_json_runs_in_the_service_and_prints_vllms_keys(
    service: tuple[BenchSupervisor, BenchRunner], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, bench = service
    argv = ["bench", "--preset", "seed", "--num-prompts", "3", "--random-input", "128"]
    argv += ["--random-output", "64", "--max-concurrency", "2", "--json"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    printed = json.loads(out)  # one JSON object, nothing else on stdout
    assert printed["completed"] == 3
    assert printed["failed"] == 0
    assert printed["profile"] == "fp8-tp1"
    for key in ("request_throughput", "output_throughput", "mean_ttft_ms", "p99_ttft_ms"):
        assert key in printed
    # the service's runner ran it, with the engine's facts from /v1/models
    (stored,) = bench.list_runs()
    assert printed["id"] == stored.id
    assert stored.info.gpu_name == "NVIDIA GB300"
    assert stored.info.vllm_version == "0.32.0"
    ran = fake_log(tmp_path)["argv"]
    for flag, value in (
        ("--tokenizer", MODEL),
        ("--num-prompts", "3"),
        ("--random-input-len", "128"),
        ("--random-output-len", "64"),
        ("--max-concurrency", "2"),
    ):
        assert ran[ran.index(flag) + 1] == value
    assert Engine.seen == [f"Bearer {Engine.key}"] * 3

    assert main(["bench", "--list", "--json"]) == 0
    (listed,) = json.loads(capsys.readouterr().out)
    assert listed["id"] == stored.id
    assert listed["completed"] == 3
    assert listed["profile"] == "fp8-tp1"
    assert main(["bench", "--list"]) == 0
    table = capsys.readouterr().out
    assert "fp8-tp1" in table
    assert "seed" in table


def test_the_window_the_engine_reports_scales_the_preset(
    service: tuple[BenchSupervisor, BenchRunner], tmp_path: Path
) -> None:
    """The seed's 2048 + 1024 tokens do not fit the stand-in's 4,096-token window: scaled."""
    assert main(["bench", "--num-prompts", "1", "--json"]) == 0
    ran = fake_log(tmp_path)["argv"]
    inp = int(ran[ran.index("--random-input-len") + 1])
    out = int(ran[ran.index("--random-output-len") + 1])
    assert inp + out <= WINDOW
    assert inp == 2 * out  # the seed's shape kept


def test_cancel_through_the_service_keeps_nothing_and_the_status_shows_the_run(
    service: tuple[BenchSupervisor, BenchRunner], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_DELAY", "0.3")  # the service's runner starts the program here
    _, bench = service
    client = control.running_service()
    assert client is not None
    remote = client.bench()
    outcomes: list[Any] = []
    thread = threading.Thread(
        target=lambda: outcomes.append(remote.run(BenchRequest(num_prompts=300)))
    )
    thread.start()
    wait_for(lambda: bench.current() is not None and bench.current().done >= 1, "progress")
    data, line = control.bench_status(bench)
    assert data is not None
    assert data["preset"] == "seed"
    assert data["total"] == 300
    assert line.startswith("Benchmark: seed running,")
    # one run at a time, for the whole Station
    with pytest.raises(BenchError, match="already running") as err:
        remote.run(BenchRequest(num_prompts=1))
    assert err.value.exit_code == 12
    assert remote.cancel() is True
    thread.join(DEADLINE_S)
    assert not thread.is_alive()
    (outcome,) = outcomes
    assert outcome.state == "cancelled"
    assert remote.list_runs() == []
    assert control.bench_status(bench) == (None, "")
    assert remote.cancel() is False


def test_a_stopped_engine_is_a_clear_error(
    service: tuple[BenchSupervisor, BenchRunner], capsys: pytest.CaptureFixture[str]
) -> None:
    supervisor, _ = service
    supervisor.state = EngineState.STOPPED
    assert main(["bench", "--num-prompts", "1"]) == BenchError.exit_code
    err = capsys.readouterr().err
    assert "The engine is not serving (stopped)" in err
    assert "step-station start" in err


def test_without_a_service_list_reads_the_local_store_and_gateway_needs_the_service(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert control.running_service() is None
    assert main(["bench", "--list", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []
    assert main(["bench", "--through-gateway"]) == BenchError.exit_code
    assert "needs the running service" in capsys.readouterr().err
