"""Past benchmark runs in SQLite, beside the chat history in the data dir.

One row per finished run: what ran (profile, flags such as MTP, image digest, vLLM version, GPU,
preset, the argv) and the result file `vllm bench serve` wrote, kept verbatim so exports are in
vLLM's own format and keys a later vLLM adds are not lost.

The schema carries a version (`PRAGMA user_version`). A file SQLite cannot read is moved aside
(never deleted: it may hold the only copy of past runs) and the error names both paths; the next
open starts an empty database.
"""

from __future__ import annotations

import csv
import io
import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appliance.bench.errors import BenchStoreError
from appliance.bench.result import BenchResult, parse_result
from appliance.settings import create_private_file, data_dir, tighten_file

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    created_at REAL NOT NULL,
    profile TEXT NOT NULL,
    flags TEXT NOT NULL DEFAULT '{}',
    image_digest TEXT NOT NULL DEFAULT '',
    vllm_version TEXT NOT NULL DEFAULT '',
    gpu_name TEXT NOT NULL DEFAULT '',
    preset TEXT NOT NULL,
    args TEXT NOT NULL DEFAULT '[]',
    result TEXT NOT NULL
);
"""

# Columns of the CSV export before vLLM's own keys.
_CSV_META = ("id", "profile", "preset", "flags", "image_digest", "vllm_version", "gpu_name")


def default_path() -> Path:
    return data_dir() / "bench.sqlite3"


@dataclass(frozen=True)
class RunInfo:
    """What ran, as the appliance knows it when the run starts."""

    profile: str
    preset: str
    args: Sequence[str] = ()
    flags: Mapping[str, Any] = field(default_factory=dict)  # e.g. {"mtp": true}
    image_digest: str = ""
    vllm_version: str = ""
    gpu_name: str = ""


@dataclass(frozen=True)
class StoredRun:
    id: int
    created_at: float
    info: RunInfo
    raw: Mapping[str, Any]  # vLLM's result object, as it wrote it

    def result(self) -> BenchResult:
        return parse_result(self.raw, where=f"Stored benchmark run {self.id}")

    def as_export(self) -> dict[str, Any]:
        """vLLM's own result object plus `profile` and `id` (what `bench --json` prints)."""
        return {**self.raw, "profile": self.info.profile, "id": self.id}


class BenchStore:
    """Thread-safe access to one database of runs. Every public method is one transaction."""

    def __init__(self, path: Path | None = None, *, clock: Callable[[], float] = time.time) -> None:
        self.path = path or default_path()
        self._clock = clock
        self._lock = threading.RLock()
        self._db: sqlite3.Connection | None = None

    # ------------------------------------------------------------------------- life cycle

    def open(self) -> BenchStore:
        with self._lock:
            if self._db is not None:
                return self
            try:
                # 0600 before SQLite opens it; its journal gets the database file's mode.
                create_private_file(self.path)
                tighten_file(self.path.with_name(self.path.name + "-journal"))
                db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            except (sqlite3.Error, OSError) as err:
                raise BenchStoreError(
                    f"Benchmark history {self.path} cannot be opened ({err}).",
                    hint="Check the disk and the file's permissions.",
                ) from err
            try:
                self._prepare(db)
            except BenchStoreError:
                db.close()
                raise
            except sqlite3.OperationalError as err:
                # Locked, read-only, out of disk: the file itself may be fine, so it stays.
                db.close()
                raise BenchStoreError(
                    f"Benchmark history {self.path} cannot be used ({err}).",
                    hint="Check free disk space and the file's permissions.",
                ) from err
            except sqlite3.DatabaseError as err:
                db.close()
                aside = self._move_aside()
                raise BenchStoreError(
                    f"Benchmark history {self.path} is damaged ({err}); it was moved to {aside}.",
                    hint="Past runs are in that file; the next benchmark starts a new history.",
                ) from err
            self._db = db
            return self

    def _prepare(self, db: sqlite3.Connection) -> None:
        db.row_factory = sqlite3.Row
        db.execute("PRAGMA journal_mode=DELETE")
        db.execute("PRAGMA synchronous=FULL")
        db.execute("PRAGMA busy_timeout=5000")
        check = db.execute("PRAGMA quick_check").fetchone()[0]
        if check != "ok":
            raise sqlite3.DatabaseError(f"quick_check: {check}")
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise BenchStoreError(
                f"Benchmark history {self.path} was written by a newer Step Station (schema "
                f"{version}, this one reads {SCHEMA_VERSION}).",
                hint="Update Step Station; the file is left as it is.",
            )
        if version < SCHEMA_VERSION:
            db.execute("BEGIN IMMEDIATE")
            db.execute(_SCHEMA)
            db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            db.execute("COMMIT")

    def _move_aside(self) -> Path:
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(self._clock()))
        aside = self.path.with_name(f"{self.path.name}.damaged-{stamp}")
        n = 1
        while aside.exists():
            n += 1
            aside = self.path.with_name(f"{self.path.name}.damaged-{stamp}-{n}")
        self.path.rename(aside)
        journal = self.path.with_name(self.path.name + "-journal")
        if journal.exists():
            journal.rename(aside.with_name(aside.name + "-journal"))
        return aside

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    def __enter__(self) -> BenchStore:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            db = self.open()._db
            assert db is not None
            try:
                db.execute("BEGIN IMMEDIATE")
                yield db
                db.execute("COMMIT")
            except sqlite3.Error as err:
                db.execute("ROLLBACK")
                raise BenchStoreError(
                    f"Benchmark history {self.path} could not be read or written ({err}).",
                    hint="Check free disk space.",
                ) from err
            except BaseException:
                db.execute("ROLLBACK")
                raise

    # ------------------------------------------------------------------------------ runs

    def add(self, info: RunInfo, raw: Mapping[str, Any]) -> int:
        """Keep one finished run; returns its id. `raw` is vLLM's result object, checked first."""
        parse_result(raw)
        with self._tx() as db:
            cur = db.execute(
                "INSERT INTO runs (created_at, profile, flags, image_digest, vllm_version, "
                "gpu_name, preset, args, result) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    self._clock(),
                    info.profile,
                    json.dumps(dict(info.flags), sort_keys=True),
                    info.image_digest,
                    info.vllm_version,
                    info.gpu_name,
                    info.preset,
                    json.dumps(list(info.args)),
                    json.dumps(raw),
                ),
            )
            run_id = cur.lastrowid
        assert run_id is not None
        return run_id

    def list_runs(self) -> list[StoredRun]:
        """Every run, newest first."""
        with self._tx() as db:
            rows = db.execute("SELECT * FROM runs ORDER BY created_at DESC, id DESC").fetchall()
        return [self._run(row) for row in rows]

    def get(self, run_id: int) -> StoredRun:
        with self._tx() as db:
            row = db.execute("SELECT * FROM runs WHERE id = ?", (run_id,)).fetchone()
        if row is None:
            raise BenchStoreError(
                f"No benchmark run {run_id}.", hint="`step-station bench --list` shows the ids."
            )
        return self._run(row)

    def delete(self, run_id: int) -> None:
        with self._tx() as db:
            deleted = db.execute("DELETE FROM runs WHERE id = ?", (run_id,)).rowcount
        if not deleted:
            raise BenchStoreError(
                f"No benchmark run {run_id}.", hint="`step-station bench --list` shows the ids."
            )

    def _run(self, row: sqlite3.Row) -> StoredRun:
        try:
            raw = json.loads(row["result"])
            info = RunInfo(
                profile=row["profile"],
                preset=row["preset"],
                args=tuple(json.loads(row["args"])),
                flags=json.loads(row["flags"]),
                image_digest=row["image_digest"],
                vllm_version=row["vllm_version"],
                gpu_name=row["gpu_name"],
            )
        except (json.JSONDecodeError, TypeError) as err:
            raise BenchStoreError(
                f"Benchmark run {row['id']} in {self.path} is unreadable ({err}).",
                hint=f"Delete it with `step-station bench --delete {row['id']}`.",
            ) from err
        return StoredRun(id=row["id"], created_at=row["created_at"], info=info, raw=raw)


# ---------------------------------------------------------------------------------- export


def export_json(runs: Sequence[StoredRun]) -> str:
    """A JSON list of vLLM's result objects, each with `profile` and `id` added."""
    return json.dumps([run.as_export() for run in runs], indent=2)


def export_csv(runs: Sequence[StoredRun]) -> str:
    """One row per run: the appliance's columns, then every scalar key of vLLM's result objects
    under vLLM's own names (lists such as per-request latencies are left out)."""
    keys: dict[str, None] = {}
    for run in runs:
        for key, value in run.raw.items():
            if not isinstance(value, (list, dict)) and key not in _CSV_META:
                keys.setdefault(key, None)
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow([*_CSV_META, *keys])
    for run in runs:
        info = run.info
        meta = [
            run.id,
            info.profile,
            info.preset,
            json.dumps(dict(info.flags), sort_keys=True),
            info.image_digest,
            info.vllm_version,
            info.gpu_name,
        ]
        writer.writerow([*meta, *(_cell(run.raw.get(key)) for key in keys)])
    return out.getvalue()


def _cell(value: object) -> object:
    return "" if value is None else value
