"""The Model tab's tuned-kernels line and the before/after pairing of benchmark runs.

Two questions an owner asks after `tune-moe` (issue 14, items 3 and 4): does this GPU run tuned
MoE kernels with this engine image, and what did tuning change? The first is read from the
folder exactly as vLLM reads it (its file name for this GPU and shape, its JSON format:
appliance/bench/tune.py cites the source); the second pairs the last benchmark run before the
config was installed with the first one after it.

No gradio here (the layer rules): the tab in ui/ shows `text` and the pair's rows.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

from appliance.bench import tune
from appliance.bench.store import StoredRun
from appliance.bench.tuning import TuneTarget, last_install
from appliance.errors import ApplianceError

TunedState = Literal["tuned", "other_image", "not_tuned", "broken", "unknown"]

# What the pair compares: (label, vLLM's result key, higher is better).
COMPARED = (
    ("Output tokens/s", "output_throughput", True),
    ("Requests/s", "request_throughput", True),
    ("TTFT mean (ms)", "mean_ttft_ms", False),
    ("TPOT mean (ms)", "mean_tpot_ms", False),
)


@dataclass(frozen=True)
class TunedView:
    """One line for the Model tab and what it is about."""

    state: TunedState
    text: str  # markdown, file names escaped
    file_name: str = ""
    installed_at: float | None = None  # when the file was installed (or written, if by hand)


def tuned_view(
    folder: Path,
    shape: tune.MoeShape | None,
    gpu_name: str,
    image_digest: str = "",
    *,
    why_unknown: str = "",
) -> TunedView:
    """Whether vLLM will find a tuned config for this GPU and shape, made with this image."""
    if shape is None or not gpu_name:
        reason = why_unknown or "the GPU or the model's expert shape is not known yet"
        return TunedView("unknown", f"Tuned MoE kernels: cannot tell ({_md(reason)}).")
    found = tune.find_config(folder, shape, gpu_name)
    name = found.file_name
    code = _code(name)
    if not found.exists or found.file is None:
        return TunedView(
            "not_tuned",
            f"Not tuned for {_md(gpu_name)}: vLLM looks for {code} and, without it, uses its "
            "default MoE kernels. `step-station tune-moe` tunes them (the engine is stopped "
            "for hours).",
            name,
        )
    if not found.usable:
        return TunedView(
            "broken",
            f"{code} is not in vLLM's format ({_md(found.file.problems[0])}): engine starts "
            "leave the tuned folder out until it is tuned again or removed.",
            name,
        )
    record = last_install(folder, name)
    when = record.installed_at if record else found.path.stat().st_mtime
    sizes = len(found.file.batch_sizes)
    triton = f", Triton {_md(found.file.triton_version)}" if found.file.triton_version else ""
    date = _date(when)
    if record is not None and image_digest and record.image_digest != image_digest:
        return TunedView(
            "other_image",
            f"Tuned for {_md(gpu_name)} with another engine image ({code}, {sizes} batch sizes"
            f"{triton}, {date}). vLLM still uses it; tune again to match this image's Triton.",
            name,
            when,
        )
    if record is None:
        made_with = "an unrecorded image"  # copied in by hand
    elif image_digest:
        made_with = "this engine image"
    else:  # the engine's image digest is not known here (not pulled, or not Docker)
        made_with = f"image {_md(record.image_digest[:19] or record.image or 'unknown')}"
    return TunedView(
        "tuned",
        f"Tuned for {_md(gpu_name)} with {made_with}: {code} ({sizes} batch sizes{triton}, "
        f"installed {date}).",
        name,
        when,
    )


def tuned_view_for(folder: Path, target: TuneTarget | None, why_unknown: str = "") -> TunedView:
    """`tuned_view` for the engine as the tuner sees it (`control.tune_target`; None with the
    reason when that failed: no checkpoint on disk yet, a process engine, an NVFP4 checkpoint)."""
    if target is None:
        return tuned_view(folder, None, "", why_unknown=why_unknown)
    try:
        shape = tune.moe_shape(target.text_config, block_shape=target.block_shape)
    except ApplianceError as err:
        return tuned_view(folder, None, "", why_unknown=err.message)
    return tuned_view(folder, shape, target.gpu_name, target.image_digest)


@dataclass(frozen=True)
class BeforeAfter:
    """The two benchmark runs either side of tuning, and their numbers side by side."""

    before: StoredRun | None
    after: StoredRun | None
    text: str
    rows: list[list[str]] = field(default_factory=list)  # metric, before, after, change


def before_after(runs: Sequence[StoredRun], installed_at: float) -> BeforeAfter:
    """The first run after the config's install, and the last run before it with the same
    profile, preset and GPU (a pair that differs in anything but the kernels says nothing
    about tuning). `runs` in any order (the store lists newest first)."""
    ordered = sorted(runs, key=lambda r: (r.created_at, r.id))
    after = next((r for r in ordered if r.created_at >= installed_at), None)
    if after is None:
        return BeforeAfter(
            None,
            None,
            "No benchmark since tuning: start the engine and run `step-station bench` to see "
            "what it changed.",
        )
    earlier = [r for r in ordered if r.created_at < installed_at and _same_setup(r, after)]
    if not earlier:
        return BeforeAfter(
            None,
            after,
            f"No run before tuning with the same profile, preset and GPU as run {after.id} "
            f"({_md(after.info.profile)}, {_md(after.info.preset)}) to compare it with.",
        )
    before = earlier[-1]
    rows = [_row(label, key, higher, before, after) for label, key, higher in COMPARED]
    return BeforeAfter(
        before,
        after,
        f"Run {before.id} (before tuning) against run {after.id} (after), "
        f"{_md(after.info.profile)} / {_md(after.info.preset)}.",
        [row for row in rows if row],
    )


def _same_setup(run: StoredRun, other: StoredRun) -> bool:
    a, b = run.info, other.info
    return (a.profile, a.preset, a.gpu_name, dict(a.flags)) == (
        b.profile,
        b.preset,
        b.gpu_name,
        dict(b.flags),
    )


def _row(label: str, key: str, higher: bool, before: StoredRun, after: StoredRun) -> list[str]:
    old, new = before.raw.get(key), after.raw.get(key)
    if not isinstance(old, (int, float)) or not isinstance(new, (int, float)):
        return []
    change = f"{(new - old) / old * 100:+.1f}%" if old else "n/a"
    if old and new != old:
        change += " (better)" if (new > old) == higher else " (worse)"
    return [label, f"{old:.2f}", f"{new:.2f}", change]


def _date(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def _code(name: str) -> str:
    # Markdown takes a code span's text as it is (no escapes inside): only a backtick could end it.
    return "`" + name.replace("`", "'") + "`"


def _md(text: str) -> str:
    """Text for markdown: HTML escaped, and the characters markdown would act on escaped."""
    escaped = html.escape(text, quote=False)
    for ch in "\\`*_[]":
        escaped = escaped.replace(ch, "\\" + ch)
    return escaped
