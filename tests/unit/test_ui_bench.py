"""The Benchmark tab's two small helpers: the plot's data and the status line."""

from __future__ import annotations

import pandas as pd

from appliance.controllers.bench import BenchView
from ui import bench


def test_the_plot_frame_keeps_text_labels_even_when_empty() -> None:
    # an empty float `label` column makes Gradio's bar plot numeric on x: no bar ever shows
    empty = bench._frame([])
    assert list(empty.columns) == ["label", "value"]
    assert pd.api.types.is_string_dtype(empty["label"])  # untyped, pandas makes it float64
    assert pd.api.types.is_float_dtype(empty["value"])
    frame = bench._frame([{"run": 3, "label": "#3 fp8-tp1 seed", "value": 129}])
    assert frame.to_dict("records") == [{"label": "#3 fp8-tp1 seed", "value": 129.0}]


def test_the_status_line_has_a_bar_while_running_and_escapes_its_text() -> None:
    running = bench._status_html(BenchView(True, "Benchmark seed: 3/12 requests, 9 s", 0.25))
    assert 'data-state="running"' in running
    assert "Benchmark seed: 3/12 requests, 9 s" in running
    assert "width: 25.0%" in running
    idle = bench._status_html(BenchView(False, "<b>odd</b>", None))
    assert 'data-state="idle"' in idle
    assert "&lt;b&gt;odd&lt;/b&gt;" in idle
    assert "ss-bar" not in idle
