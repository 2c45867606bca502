"""The model tab (placeholder until its issue lands)."""

from __future__ import annotations

from typing import Any

import gradio as gr


def build(services: Any) -> None:
    """Create the tab's widgets inside the current gr.Tab and wire them to services."""
    del services
    gr.Markdown("This tab is not built yet.")
