"""The Benchmark panel's logic: start returns at once and the run goes on in the background,
view() follows it, cancel keeps nothing, wrong numbers and a busy runner are told in the view,
past runs as rows, plot points and exports in vLLM's own format. Real runner and store; the
engine and `vllm` are the stand-ins of tests/fixtures/bench_kit.py."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
from fixtures.bench_kit import (
    DEADLINE_S,
    WINDOW,
    Engine,
    engine_socket,
    fake_vllm,
    wait_for,
)

from appliance import endpoint
from appliance.bench.runner import BenchRunner, BenchTarget
from appliance.bench.store import BenchStore
from appliance.controllers.bench import RUN_COLUMNS, BenchPanel, preset_choices
from appliance.errors import EngineError

__all__ = ["engine_socket", "fake_vllm"]  # fixtures, used by name


def make_panel(url: str, program: Path, tmp_path: Path) -> BenchPanel:
    target = BenchTarget(
        engine_url=url,
        api_key=Engine.key,
        served_model_name="step3p7-flash",
        model="/models/tiny",
        context_len=WINDOW,
        profile="fp8-tp1",
        runtime="process",
        program=str(program),
        vllm_version="0.32.0",
        flags={"mtp": True},
    )
    return BenchPanel(BenchRunner(BenchStore(tmp_path / "bench.sqlite3")), lambda: target)


def test_a_run_started_from_the_panel_is_followed_and_kept(
    engine_socket: str, fake_vllm: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_DELAY", "0.2")
    panel = make_panel(endpoint.socket_url(engine_socket), fake_vllm, tmp_path)
    view = panel.start("chat", num_prompts="4", random_input=64, random_output="32")
    assert view.running  # start() came back while the run goes on: the page is not held for it
    assert view.error == ""
    wait_for(lambda: (panel.view().fraction or 0) > 0, "progress in the view")
    assert panel.view().status.startswith("Benchmark chat: ")
    assert panel.wait(DEADLINE_S)
    done = panel.view()
    assert not done.running
    assert done.last_id is not None
    assert done.status == f"Run {done.last_id} finished and was kept."
    (row,) = done.rows
    assert len(row) == len(RUN_COLUMNS)
    assert row[0] == done.last_id
    assert row[2:6] == ["fp8-tp1", "chat", "on", 4]
    assert row[13] == "0.32.0"
    points = panel.compare([], "output_throughput")
    assert [p["run"] for p in points] == [done.last_id]
    assert points[0]["label"] == f"#{done.last_id} fp8-tp1 MTP chat"
    name, text = panel.export("json")
    assert name.endswith(".json")
    (exported,) = json.loads(text)
    assert exported["id"] == done.last_id
    assert exported["profile"] == "fp8-tp1"
    assert exported["completed"] == 4
    name, text = panel.export("csv")
    (csv_row,) = csv.DictReader(io.StringIO(text))
    assert csv_row["completed"] == "4"


def test_cancel_from_the_panel_keeps_nothing(
    engine_socket: str, fake_vllm: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_DELAY", "0.3")
    panel = make_panel(endpoint.socket_url(engine_socket), fake_vllm, tmp_path)
    panel.start("seed", num_prompts=200)
    wait_for(lambda: (panel.view().fraction or 0) > 0, "the first request")
    # a second start while it runs is told, and the first goes on
    busy = panel.start("seed", num_prompts=1)
    assert "already running" in busy.error
    assert busy.running
    panel.cancel()
    assert panel.wait(DEADLINE_S)
    view = panel.view()
    assert view.status == "Cancelled; nothing was kept."
    assert view.rows == []


def test_wrong_numbers_and_a_stopped_engine_are_told_in_the_view(
    fake_vllm: Path, tmp_path: Path
) -> None:
    panel = make_panel("http://127.0.0.1:9", fake_vllm, tmp_path)
    for value in ("0", "-3", "2.5", "many"):
        view = panel.start("seed", num_prompts=value)
        assert not view.running
        assert "Prompts must be a whole number" in view.error

    def stopped() -> BenchTarget:
        raise EngineError("The engine is not serving (stopped).")

    panel = BenchPanel(panel.runner, stopped)
    view = panel.start("seed")
    assert view.error == "The engine is not serving (stopped)."
    assert view.status == "No benchmark running."


def test_preset_choices_name_every_preset() -> None:
    values = [value for _, value in preset_choices()]
    assert values == ["seed", "chat", "long", "image"]


def test_a_run_whose_requests_fail_is_told_after_it_ends(
    engine_socket: str, fake_vllm: Path, tmp_path: Path
) -> None:
    panel = make_panel(endpoint.socket_url(engine_socket), fake_vllm, tmp_path)
    target = panel._target()
    wrong_key = BenchTarget(**{**target.__dict__, "api_key": "sk-wrong"})
    panel = BenchPanel(panel.runner, lambda: wrong_key)
    assert panel.start("seed", num_prompts=2).error == ""
    assert panel.wait(DEADLINE_S)
    view = panel.view()
    assert view.status == "The benchmark did not finish."
    assert "2 of 2 requests failed" in view.error
    assert view.rows == []
