"""Docker's pull stream -> bytes done / total, per layer (the events as Docker 20.10 sends them)."""

from __future__ import annotations

import pytest

from appliance.engine.docker_runtime import PullProgress
from appliance.errors import ImagePullError


def down(layer: str, current: int, total: int) -> dict:
    return {
        "status": "Downloading",
        "id": layer,
        "progressDetail": {"current": current, "total": total},
    }


def test_bytes_add_up_over_layers() -> None:
    p = PullProgress("img:1")
    for event in (
        {"status": "Pulling from vllm/vllm-openai", "id": "stepfun37"},
        {"status": "Pulling fs layer", "id": "a", "progressDetail": {}},
        {"status": "Already exists", "id": "base", "progressDetail": {}},
        down("a", 100, 1000),
        down("b", 50, 500),
        down("a", 600, 1000),
    ):
        p.take(event)
    assert (p.done, p.total) == (650, 1500)
    p.take({"status": "Download complete", "id": "a", "progressDetail": {}})
    assert (p.done, p.total) == (1050, 1500)
    assert p.line() == "2/3 layers"


def test_a_resumed_layer_keeps_its_full_size() -> None:
    p = PullProgress("img:1")
    p.take(down("a", 400, 1000))
    p.take({"status": "Retrying in 5 seconds", "id": "a", "progressDetail": {}})
    assert "retries in 5 s" in p.line()
    p.take(down("a", 100, 600))  # Docker resumes at 400: total is what is left
    assert (p.done, p.total) == (500, 1000)


def test_unknown_sizes_are_not_counted() -> None:
    p = PullProgress("img:1")
    p.take(down("a", 100, -1))
    p.take({"status": "Extracting", "id": "a", "progressDetail": {"current": 5}})
    assert (p.done, p.total) == (0, 0)


def test_in_band_error_raises_with_what_to_do() -> None:
    p = PullProgress("localhost:5/x:1")
    p.take(down("a", 100, 1000))
    with pytest.raises(ImagePullError, match="registry cannot be reached"):
        p.take({"errorDetail": {"message": "dial tcp 127.0.0.1:5: connect: connection refused"},
                "error": "dial tcp ..."})  # fmt: skip
    with pytest.raises(ImagePullError, match=r"Check engine\.image"):
        p.take({"error": "manifest unknown", "errorDetail": {"message": "manifest unknown"}})
