"""Progress of a running `vllm bench serve`, read from its stderr.

vLLM draws a tqdm bar on stderr (`tqdm(total=num_prompts)`, one step per finished request),
redrawn with `\\r` even when stderr is a pipe, e.g.

    \\r 62%|██████▎   | 5/8 [00:06<00:03,  1.17s/it]

Chunks read from a pipe split frames (and the bar's multi-byte characters) anywhere, and other
lines (warnings) are mixed in, so the reader buffers, decodes incrementally and takes only whole
frames.
"""

from __future__ import annotations

import codecs
import re
from dataclasses import dataclass

# `| n/total [elapsed<remaining` with tqdm's times: [H:]MM:SS, or `?` before the first step.
_FRAME = re.compile(
    r"\|\s*(?P<done>\d+)/(?P<total>\d+)\s*"
    r"\[(?P<elapsed>(?:\d+:)?\d+:\d\d)<(?P<remaining>(?:\d+:)?\d+:\d\d|\?)[^\]]*\]"
)
_SEPARATORS = re.compile(r"[\r\n]")


@dataclass(frozen=True)
class Progress:
    """Requests finished out of all, and time as tqdm counts it (whole seconds)."""

    done: int
    total: int
    elapsed_s: int
    remaining_s: int | None  # None until tqdm has a rate to estimate from

    @property
    def fraction(self) -> float:
        return self.done / self.total if self.total else 0.0


def _seconds(text: str) -> int:
    total = 0
    for part in text.split(":"):
        total = total * 60 + int(part)
    return total


def parse_frame(text: str) -> Progress | None:
    """The progress in one tqdm frame, or None if `text` is not a (whole) frame."""
    match = _FRAME.search(text)
    if match is None:
        return None
    remaining = match["remaining"]
    return Progress(
        done=int(match["done"]),
        total=int(match["total"]),
        elapsed_s=_seconds(match["elapsed"]),
        remaining_s=None if remaining == "?" else _seconds(remaining),
    )


class ProgressReader:
    """Feed it stderr as it arrives; `latest` is the newest whole frame seen."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._pending = ""
        self.latest: Progress | None = None

    def feed(self, chunk: bytes | str) -> Progress | None:
        """Take one chunk; returns the newest progress so far (None before the first frame)."""
        text = self._decoder.decode(chunk) if isinstance(chunk, bytes) else chunk
        pieces = _SEPARATORS.split(self._pending + text)
        # The last piece may be cut short; keep it for the next chunk. A frame is whole once
        # its closing `]` is there, so it still counts now if it already parses.
        self._pending = pieces[-1]
        for piece in pieces:
            progress = parse_frame(piece)
            if progress is not None:
                self.latest = progress
        if len(self._pending) > 4096:
            self._pending = self._pending[-4096:]  # a long line without frames: keep it bounded
        return self.latest
