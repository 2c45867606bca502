"""Model weights: downloaded by the appliance into the HF cache that is mounted into the engine.

huggingface_hub does the download (resumable: `.incomplete` blobs continue where they stopped).
Progress is measured on disk (bytes in the repo's blob folder against the listed sizes), which
does not depend on huggingface_hub's progress-bar internals. The free disk space is checked
first, against what is still missing. `HF_ENDPOINT` is read at call time, not import time, so
tests (and mirrors) can point it at another hub.
"""

from __future__ import annotations

import errno
import os
import shutil
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from huggingface_hub import HfApi, snapshot_download
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from appliance.errors import WeightsError
from appliance.units import fmt_bytes, fmt_progress

Progress = Callable[[int, int, str], None]

DISK_MARGIN_BYTES = 1 << 30  # keep 1 GiB free beyond the weights (logs, compile caches)
POLL_S = 0.5


def repo_folder(hf_cache: Path, repo_id: str) -> Path:
    """Where huggingface_hub keeps one model repo inside `<HF_HOME>/hub`."""
    return hf_cache / "hub" / ("models--" + repo_id.replace("/", "--"))


def bytes_on_disk(folder: Path) -> int:
    """Bytes of the repo's blobs, complete and `.incomplete` (resumed downloads count)."""
    blobs = folder / "blobs"
    if not blobs.is_dir():
        return 0
    total = 0
    for entry in os.scandir(blobs):
        try:
            total += entry.stat(follow_symlinks=False).st_size
        except FileNotFoundError:  # an .incomplete renamed while we looked
            continue
    return total


def _endpoint() -> str | None:
    return os.environ.get("HF_ENDPOINT") or None


def _explain(repo_id: str, err: Exception, token: str) -> WeightsError:
    url = f"https://huggingface.co/{repo_id}"
    if isinstance(err, GatedRepoError):
        return WeightsError(
            f"The model {repo_id} is gated: your Hugging Face account must accept its terms.",
            hint=f"Accept them at {url}, then store your token with "
            "`step-station config set-secret hf_token`.",
        )
    if isinstance(err, RevisionNotFoundError):
        return WeightsError(f"The model {repo_id} has no such revision ({err}).")
    if isinstance(err, RepositoryNotFoundError):
        who = "your token cannot see it" if token else "no Hugging Face token is set"
        return WeightsError(
            f"The model repository {repo_id} was not found on the Hub "
            f"(or it is private and {who}).",
            hint="Check the profile or engine.model_override, and the token "
            "(`step-station config set-secret hf_token`).",
        )
    if isinstance(err, HfHubHTTPError):
        status = err.response.status_code if err.response is not None else None
        if status in (401, 403):
            return WeightsError(
                f"The Hugging Face Hub refused the token for {repo_id} (HTTP {status}).",
                hint="Store a valid token with `step-station config set-secret hf_token` "
                "(read access is enough).",
            )
        return WeightsError(
            f"The Hugging Face Hub answered an error for {repo_id} ({err}).",
            hint="Try again later; downloaded files are kept and the download resumes.",
        )
    if isinstance(err, LocalEntryNotFoundError):
        return WeightsError(
            f"Cannot reach the Hugging Face Hub to download {repo_id}, and it is not in the cache.",
            hint="Check the network (or HF_ENDPOINT), then start again; the download resumes.",
        )
    if isinstance(err, OSError) and err.errno == errno.ENOSPC:
        return WeightsError(
            f"The disk filled up while downloading {repo_id}.",
            hint="Free space (or set engine.hf_cache_dir to a larger disk), then start again; "
            "the download resumes.",
        )
    return WeightsError(f"Downloading {repo_id} failed: {err}.", hint="Start again to resume.")


def remote_size(repo_id: str, *, token: str = "", revision: str | None = None) -> tuple[str, int]:
    """(commit sha, total bytes of every file) as the Hub lists them."""
    api = HfApi(endpoint=_endpoint(), token=token or False)
    try:
        info = api.repo_info(repo_id, revision=revision)
        sha = str(info.sha)
        files = api.list_repo_tree(repo_id, recursive=True, revision=sha)
        total = sum(int(getattr(f, "size", 0) or 0) for f in files if hasattr(f, "size"))
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as err:
        raise _explain(repo_id, err, token) from err
    except Exception as err:  # noqa: BLE001 - connection errors come from the hub's http stack
        raise _explain(repo_id, LocalEntryNotFoundError(str(err)), token) from err
    return sha, total


def check_disk(hf_cache: Path, repo_id: str, needed: int) -> None:
    """WeightsError naming the bytes needed and the path when the disk is too small."""
    probe = hf_cache
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if needed + DISK_MARGIN_BYTES > free:
        raise WeightsError(
            f"Not enough disk space for {repo_id}: {fmt_bytes(needed)} more is needed in "
            f"{hf_cache} (plus {fmt_bytes(DISK_MARGIN_BYTES)} margin) and "
            f"{fmt_bytes(free)} is free.",
            hint="Free space, or point the cache at a larger disk with "
            "`step-station config set engine.hf_cache_dir PATH`.",
        )


def ensure_weights(
    repo_id: str,
    *,
    hf_cache: str | Path,
    token: str = "",
    on_progress: Progress | None = None,
    cancel: threading.Event | None = None,
    revision: str | None = None,
) -> Path:
    """Download `repo_id` into `<hf_cache>/hub` (nothing when complete); returns the snapshot.

    Raises WeightsError with what to do: disk too small, repo missing or gated, token refused,
    Hub unreachable.
    """
    cache = Path(hf_cache).expanduser()
    folder = repo_folder(cache, repo_id)
    report = on_progress or (lambda done, total, line: None)
    sha, total = remote_size(repo_id, token=token, revision=revision)
    have = bytes_on_disk(folder)
    check_disk(cache, repo_id, max(0, total - have))
    (cache / "hub").mkdir(parents=True, exist_ok=True)
    report(min(have, total), total, fmt_progress(min(have, total), total))

    result: dict[str, Any] = {}

    def download() -> None:
        try:
            result["path"] = snapshot_download(
                repo_id,
                revision=revision,
                cache_dir=str(cache / "hub"),
                token=token or False,
                endpoint=_endpoint(),
            )
        except BaseException as err:  # noqa: BLE001 - handed to the waiting thread
            result["error"] = err

    worker = threading.Thread(target=download, name="weights-download", daemon=True)
    worker.start()
    stop = cancel or threading.Event()
    while worker.is_alive():
        worker.join(POLL_S)
        done = min(bytes_on_disk(folder), total)
        report(done, total, fmt_progress(done, total))
        if stop.is_set():
            raise WeightsError(
                f"Download of {repo_id} cancelled; what was fetched is kept and resumes next time."
            )
    error = result.get("error")
    if error is not None:
        raise _explain(repo_id, error, token) from error
    del sha
    report(total, total, f"{fmt_bytes(total)}, complete")
    return Path(result["path"])
