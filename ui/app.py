"""The Gradio UI: one Blocks with a tab per area, mounted into the appliance's FastAPI app.

Each tab module exposes `build(services)` and creates its widgets inside the `gr.Tab` opened
here. Chat events run concurrently (`concurrency_limit=None` on them); everything else shares
a generous default so one slow click never queues another person's chat.
"""

from __future__ import annotations

import os
from typing import Any

import gradio as gr
from fastapi import FastAPI

from appliance.services import Services
from ui import bench, chat, dashboard, live, model, queue_wake, sharing

DEFAULT_CONCURRENCY = 16
# Gradio's queue looks for new events every 1 ms while it has none: ~70 ms of CPU a second on an
# idle appliance, most of what it used. Every 5 ms costs a fifth of that and starts a click's
# event on average ~2 ms later (benchmarks/ui_idle.py measures both, side by side).
# Since issue 16 the queue sleeps until an event comes (ui/queue_wake.py); setting
# STEP_STATION_QUEUE_POLL_MS brings back the polling (benchmarks/sampler_cost.py compares them).
QUEUE_POLL_MS = float(os.environ.get("STEP_STATION_QUEUE_POLL_MS") or 5)
QUEUE_POLLS = bool(os.environ.get("STEP_STATION_QUEUE_POLL_MS"))
TAB_IDS = ("chat", "model", "dashboard", "bench", "sharing")


def build_ui(services: Services) -> gr.Blocks:
    blocks = gr.Blocks(title="Step Station", analytics_enabled=False, fill_width=True)
    with blocks:
        with gr.Tabs(selected="chat", elem_id="tabs") as tabs:
            with gr.Tab("Chat", id="chat", elem_id="tab-chat"):
                chat_tab = chat.build(services)
            with gr.Tab("Model", id="model", elem_id="tab-model"):
                model.build(services)
            with gr.Tab("Dashboard", id="dashboard", elem_id="tab-dashboard"):
                dashboard.build(services)
            with gr.Tab("Benchmark", id="bench", elem_id="tab-bench"):
                bench.build(services)
            with gr.Tab("Sharing", id="sharing", elem_id="tab-sharing"):
                sharing.build(services)
        chat_tab.go_to_model.click(lambda: gr.Tabs(selected="model"), None, [tabs])
        blocks.load(
            chat_tab.on_load,
            chat_tab.load_inputs,
            chat_tab.load_outputs,
            show_progress="hidden",
        ).then(
            # The page's conversation, preset and level are in place: a choice made before this
            # (a fast click, a test) would be set back by the load's answer. Tests and the
            # benchmarks wait for this mark (tests/browser/chat_page.py open_chat).
            None,
            None,
            None,
            js="() => { document.body.dataset.chatLoaded = '1'; }",
            queue=False,
        )
    blocks.queue(default_concurrency_limit=DEFAULT_CONCURRENCY)
    if QUEUE_POLLS or not queue_wake.install(blocks._queue):
        tune_queue(blocks, QUEUE_POLL_MS)
    return blocks


def tune_queue(blocks: gr.Blocks, poll_ms: float) -> None:
    """Set how often the idle queue polls (a Gradio internal; a test checks it still exists)."""
    queue = getattr(blocks, "_queue", None)
    if queue is not None and hasattr(queue, "sleep_when_free"):
        queue.sleep_when_free = max(0.001, poll_ms / 1000)


def mount(app: FastAPI, services: Services) -> FastAPI:
    """Mount the UI at `/` of the UI listener's app (after its own routes, e.g. /healthz)."""
    if dashboard.push_mode():  # the dashboard's live values (before Gradio takes `/`)
        live.add_routes(app, services.sampler, dashboard.controller_for(services))
    blocks = build_ui(services)
    chat.image_folder().mkdir(parents=True, exist_ok=True)
    chat.export_folder().mkdir(parents=True, exist_ok=True)
    mounted: FastAPI = gr.mount_gradio_app(
        app,
        blocks,
        path="/",
        server_name=services.settings.ui.host,
        server_port=services.settings.ui.port,
        allowed_paths=[str(chat.export_folder())],
        footer_links=["settings"],
        # Gradio's run history keeps every event's inputs and outputs in the browser's storage:
        # new API keys, passwords, chat text. Off (and what an older version saved is deleted).
        run_history=False,
        ssr_mode=False,
        css=chat.CSS,
        head=chat.HEAD,  # no remote images in the page (issue 12 item 8)
        max_file_size=chat.max_upload_bytes(services.settings),  # = chat.max_image_mb
        show_error=True,
        **_owner_login(services),
    )
    return mounted


def _owner_login(services: Services) -> dict[str, Any]:
    """With "UI on LAN" on (Sharing tab), every page needs the owner login."""
    from appliance.keys import OwnerLogin, ui_lan_active

    if not ui_lan_active(services.settings):
        return {}
    # A coroutine function: Gradio's POST /login awaits it, and the slow hash runs on a login
    # thread (a plain function would be called inline, in the event loop every chat streams on).
    # Throttling, session lifetime and POST-only logout: appliance/login_guard.py.
    return {"auth": OwnerLogin().check_async, "auth_message": "Step Station: owner login"}
