"""The engine's key: a fresh random secret for every engine start, so only the appliance can use it.

vLLM enforces it through `VLLM_API_KEY` (read by `vllm/envs.py`; the server adds its
AuthenticationMiddleware when `--api-key` or that variable is set: 0.23
`entrypoints/openai/api_server.py`, 0.32 `entrypoints/serve/middleware/register.py`). The key must
appear neither in `docker inspect` (Env, Cmd, Labels) nor on a command line (`ps`), so it lives in
a 0600 file in a private folder of the appliance's data dir, one folder per start:

    <data>/engine-keys/<engine name>/<key id>/engine-key      (folders 0700, file 0600)

The Docker runtime mounts that folder read-only at `/run/step-station` and the container's shell
entrypoint reads the file into `VLLM_API_KEY` before exec'ing `vllm serve`; the process runtime
passes the key in the child's environment. The container carries only the key *id* (a label, not a
secret), so a restarted appliance adopting a running engine reads the key back from its own file.
The folder goes when the engine is removed; a new start prunes the folders of earlier starts.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from appliance import settings as st

KEY_FILE = "engine-key"
HF_TOKEN_FILE = "hf-token"  # only when the engine itself must download (see spec.with_engine_key)
LABEL_KEY_ID = "io.step-station.engine-key-id"
_ID_CHARS = set("0123456789abcdef")


@dataclass(frozen=True)
class EngineKey:
    """One start's key: `secret` goes to the engine and its clients; `folder` holds its file."""

    id: str
    folder: Path
    secret: str = field(repr=False)


def keys_root() -> Path:
    return st.data_dir() / "engine-keys"


def _private_dir(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o700)


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        out.write(text)


def issue(name: str, *, hf_token: str = "", root: Path | None = None) -> EngineKey:
    """A new key for engine `name`, written to a fresh private folder; the folders of earlier
    starts of that engine are removed (their engines are gone by now: a start removes them)."""
    base = (root or keys_root()) / name
    _private_dir(base.parent)
    _private_dir(base)
    for old in base.iterdir():
        shutil.rmtree(old, ignore_errors=True)
    key_id = secrets.token_hex(8)
    folder = base / key_id
    folder.mkdir(mode=0o700)
    os.chmod(folder, 0o700)
    secret = "sk-engine-" + secrets.token_urlsafe(32)
    _write_private(folder / KEY_FILE, secret + "\n")  # a line: `read` in the entrypoint
    if hf_token:
        _write_private(folder / HF_TOKEN_FILE, hf_token + "\n")
    return EngineKey(key_id, folder, secret)


def _folder(name: str, labels: Mapping[str, str], root: Path | None) -> Path | None:
    key_id = labels.get(LABEL_KEY_ID, "")
    if not key_id or not set(key_id) <= _ID_CHARS:  # a label is outside input: no path tricks
        return None
    return (root or keys_root()) / name / key_id


def recover(name: str, labels: Mapping[str, str], *, root: Path | None = None) -> str | None:
    """The key of a running engine from its labels: "" when it was started without one (by an
    older appliance), None when it has one but its file is gone (restart it to get a new one)."""
    folder = _folder(name, labels, root)
    if folder is None:
        return "" if LABEL_KEY_ID not in labels else None
    try:
        return (folder / KEY_FILE).read_text(encoding="utf-8").strip() or None
    except OSError:
        return None


def discard(name: str, labels: Mapping[str, str], *, root: Path | None = None) -> None:
    """Remove the key folder of a removed engine."""
    folder = _folder(name, labels, root)
    if folder is not None:
        with contextlib.suppress(OSError):
            shutil.rmtree(folder)
