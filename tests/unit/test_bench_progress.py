"""Reading `vllm bench serve`'s tqdm bar from its stderr, whole frames only."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance.bench.progress import Progress, ProgressReader, parse_frame

STDERR = (
    Path(__file__).resolve().parents[1] / "data" / "bench" / "stderr-0.32-tqdm.txt"
).read_bytes()


def test_real_stderr_in_one_chunk_ends_at_the_last_frame() -> None:
    reader = ProgressReader()
    assert reader.feed(STDERR) == Progress(done=8, total=8, elapsed_s=6, remaining_s=0)


def test_real_stderr_byte_by_byte_passes_through_every_frame() -> None:
    reader = ProgressReader()
    seen: list[Progress] = []
    for i in range(len(STDERR)):
        progress = reader.feed(STDERR[i : i + 1])
        if progress is not None and (not seen or seen[-1] != progress):
            seen.append(progress)
    assert [(p.done, p.total) for p in seen] == [(0, 8), (1, 8), (5, 8), (8, 8)]
    assert seen[0].remaining_s is None  # `<?` before the first request finished
    assert seen[1] == Progress(done=1, total=8, elapsed_s=3, remaining_s=22)


@pytest.mark.parametrize("size", [2, 3, 7, 50])
def test_chunks_that_split_frames_and_characters_give_the_same_end(size: int) -> None:
    reader = ProgressReader()
    for i in range(0, len(STDERR), size):
        reader.feed(STDERR[i : i + size])
    assert reader.latest == Progress(done=8, total=8, elapsed_s=6, remaining_s=0)


def test_a_half_frame_is_not_read_until_it_is_whole() -> None:
    reader = ProgressReader()
    reader.feed("\r 12%|█▎        | 1/8 [00:03<00:22,  3.22s/it]")
    assert reader.feed("\r 62%|██████▎   | 5/") == Progress(1, 8, 3, 22)
    assert reader.feed("8 [00:06<00:03,  1.17s/it]") == Progress(5, 8, 6, 3)


def test_warnings_between_frames_are_ignored() -> None:
    reader = ProgressReader()
    reader.feed("WARNING: /tokenize unavailable, skipping alignment.\n")
    assert reader.latest is None
    reader.feed("\r  0%|          | 0/100 [00:00<?, ?it/s]")
    reader.feed("\nnanobind: leaked 4 instances!\n")
    assert reader.latest == Progress(done=0, total=100, elapsed_s=0, remaining_s=None)


def test_hours_in_elapsed_time() -> None:
    progress = parse_frame(" 50%|█████     | 50/100 [1:02:03<1:02:03, 74.46s/it]")
    assert progress == Progress(done=50, total=100, elapsed_s=3723, remaining_s=3723)
    assert progress.fraction == 0.5


def test_not_a_frame() -> None:
    assert parse_frame("Starting main benchmark run...") is None
    assert parse_frame("") is None
