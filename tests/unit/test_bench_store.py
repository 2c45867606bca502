"""The database of past benchmark runs: keep, list, get, delete, export, and damaged files."""

from __future__ import annotations

import csv
import io
import json
import sqlite3
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from appliance.bench import store as store_mod
from appliance.bench.errors import BenchResultError, BenchStoreError
from appliance.bench.store import BenchStore, RunInfo, export_csv, export_json
from appliance.settings import data_dir

REAL = Path(__file__).resolve().parents[1] / "data" / "bench" / "result-0.32-spec-decode.json"

INFO = RunInfo(
    profile="fp8-tp1",
    preset="seed",
    args=("--backend", "vllm", "--num-prompts", "100"),
    flags={"mtp": True},
    image_digest="sha256:abc",
    vllm_version="0.32.0",
    gpu_name="NVIDIA GB300",
)


def raw(**changes: Any) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(REAL.read_text())
    return data | changes


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        self.now += 1
        return self.now


@pytest.fixture
def bench_store() -> Iterator[BenchStore]:
    with BenchStore(clock=Clock()) as s:
        yield s


def test_default_file_is_beside_the_chat_history_and_private(bench_store: BenchStore) -> None:
    bench_store.add(INFO, raw())
    assert bench_store.path == data_dir() / "bench.sqlite3"
    assert stat.S_IMODE(bench_store.path.stat().st_mode) == 0o600


def test_a_run_comes_back_as_it_was_kept(bench_store: BenchStore) -> None:
    run_id = bench_store.add(INFO, raw())
    run = bench_store.get(run_id)
    assert run.info == RunInfo(**{**INFO.__dict__, "args": tuple(INFO.args)})
    assert run.raw == raw()
    assert run.result().output_throughput == pytest.approx(2187.7173990718516)
    assert run.created_at == pytest.approx(1_700_000_001.0)


def test_runs_survive_reopening_and_list_newest_first(tmp_path: Path) -> None:
    path = tmp_path / "b.sqlite3"
    with BenchStore(path, clock=Clock()) as s:
        first = s.add(INFO, raw(completed=8))
        second = s.add(RunInfo(profile="nvfp4-tp1", preset="chat"), raw(completed=7, failed=1))
    with BenchStore(path) as s:
        runs = s.list_runs()
    assert [r.id for r in runs] == [second, first]
    assert runs[0].info.profile == "nvfp4-tp1"
    assert runs[0].info.flags == {}


def test_delete_removes_one_run_and_unknown_ids_are_errors(bench_store: BenchStore) -> None:
    a = bench_store.add(INFO, raw())
    b = bench_store.add(INFO, raw())
    bench_store.delete(a)
    assert [r.id for r in bench_store.list_runs()] == [b]
    with pytest.raises(BenchStoreError, match=f"No benchmark run {a}"):
        bench_store.delete(a)
    with pytest.raises(BenchStoreError, match="No benchmark run 999"):
        bench_store.get(999)


def test_a_result_that_is_not_vllms_is_not_kept(bench_store: BenchStore) -> None:
    with pytest.raises(BenchResultError):
        bench_store.add(INFO, {"completed": 3})
    assert bench_store.list_runs() == []


def test_schema_version_is_recorded(bench_store: BenchStore) -> None:
    bench_store.list_runs()
    db = sqlite3.connect(bench_store.path)
    try:
        assert db.execute("PRAGMA user_version").fetchone()[0] == store_mod.SCHEMA_VERSION
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
    finally:
        db.close()


def test_a_newer_schema_is_refused_and_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "b.sqlite3"
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version={store_mod.SCHEMA_VERSION + 1}")
    db.close()
    before = path.read_bytes()
    with pytest.raises(BenchStoreError, match="newer Step Station"):
        BenchStore(path).open()
    assert path.read_bytes() == before


def test_a_damaged_file_is_moved_aside_not_deleted(tmp_path: Path) -> None:
    path = tmp_path / "b.sqlite3"
    path.write_bytes(b"this is not a database, it is garbage " * 200)
    with pytest.raises(BenchStoreError, match="is damaged") as err:
        BenchStore(path, clock=Clock()).open()
    message = str(err.value)
    assert str(path) in message
    (aside,) = tmp_path.glob("b.sqlite3.damaged-*")
    assert str(aside) in message
    assert aside.read_bytes().startswith(b"this is not a database")
    # The next open starts an empty history in the usual place.
    with BenchStore(path) as s:
        assert s.list_runs() == []
        s.add(INFO, raw())


def test_a_database_with_a_broken_page_is_moved_aside(tmp_path: Path) -> None:
    path = tmp_path / "b.sqlite3"
    with BenchStore(path) as s:
        for _ in range(30):
            s.add(INFO, raw())
    data = bytearray(path.read_bytes())
    page = 4096
    data[page : 3 * page] = b"\xff" * (2 * page)  # clobber table pages after the header page
    path.write_bytes(bytes(data))
    with pytest.raises(BenchStoreError, match="damaged"):
        BenchStore(path).open()
    assert list(tmp_path.glob("b.sqlite3.damaged-*"))


def test_json_export_is_vllms_result_plus_profile_and_id(bench_store: BenchStore) -> None:
    run_id = bench_store.add(INFO, raw())
    (exported,) = json.loads(export_json(bench_store.list_runs()))
    assert exported == raw() | {"profile": "fp8-tp1", "id": run_id}


def test_csv_export_has_vllms_keys_and_one_row_per_run(bench_store: BenchStore) -> None:
    bench_store.add(INFO, raw())
    bench_store.add(RunInfo(profile="nvfp4-tp1", preset="chat"), raw(request_goodput=None))
    rows = list(csv.DictReader(io.StringIO(export_csv(bench_store.list_runs()))))
    assert [r["profile"] for r in rows] == ["nvfp4-tp1", "fp8-tp1"]
    assert float(rows[1]["output_throughput"]) == pytest.approx(2187.7173990718516)
    assert rows[1]["p99_ttft_ms"] == repr(raw()["p99_ttft_ms"])
    assert rows[1]["flags"] == '{"mtp": true}'
    assert rows[1]["spec_decode_acceptance_rate"] != ""
    assert rows[0]["request_goodput"] == ""
    # Per-request lists are not CSV cells.
    assert "latencies" not in rows[0]
    assert "spec_decode_per_position_acceptance_rates" not in rows[0]
