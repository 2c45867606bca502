"""Live values pushed to the page: one server-sent-event stream per visible dashboard (issue 16).

`GET /ss-live/dashboard` streams the dashboard's current values (the cards, the memory breakdown,
the activity line and, when this Station fronts a fleet, the fleet's members, as the HTML
`DashboardController` makes) each time the sampler has a new sample, and only what changed; the
15-minute plots (server-drawn SVG) ride along every five seconds. The
page opens it with `EventSource` while the Dashboard panel is on screen and the browser tab is in
front (ui/polling.py's visibility rule), closes it otherwise, and writes the HTML into the panel.
No Gradio event is involved: a Gradio queue event costs the appliance ~13 ms of CPU, a
generator's yield ~20 ms (Gradio diffs every output against the last); an SSE message here costs
well under 1 ms.

Doors: the route sits behind the UI listener's guard like every UI route (appliance/web_guard.py:
Host and Origin checks, the per-install cookie on loopback); with "UI on LAN" it asks for the
owner's Gradio session itself (the same cookie and token table Gradio's own `login_check` reads),
since a route outside Gradio does not get Gradio's `auth`.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from appliance.controllers.dashboard import DashboardController

DASHBOARD_PATH = "/ss-live/dashboard"
KEEPALIVE_S = 15.0  # a comment line when nothing came: a closed page is then noticed


def _event(data: dict[str, str]) -> bytes:
    return f"data: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


async def dashboard_events(
    sampler: Any, controller: DashboardController, is_disconnected: Callable[[], Any]
) -> AsyncIterator[bytes]:
    """Everything at once, then at each new sample the parts that changed."""
    loop = asyncio.get_running_loop()
    new_sample = asyncio.Event()
    handle = sampler.watch(lambda _sample: loop.call_soon_threadsafe(new_sample.set))
    try:
        seen_at, seen_line, seen_fleet, seen_plots = 0.0, None, None, -1.0
        while True:
            new_sample.clear()
            update: dict[str, str] = {}
            line = controller.activity()
            if line != seen_line:
                update["activity"] = seen_line = line
            fleet = controller.fleet_html()
            if fleet != seen_fleet:
                update["fleet"] = seen_fleet = fleet
            values = controller.values(seen_at)
            if values is not None:
                update["current"], update["breakdown"] = values.current, values.breakdown
                seen_at = values.at
            plots = controller.plots_html()  # redrawn every PLOT_EVERY_S, for all pages at once
            if plots is not None and plots[0] != seen_plots:
                seen_plots, update["plots"] = plots
            if update:
                yield _event(update)
            try:
                await asyncio.wait_for(new_sample.wait(), KEEPALIVE_S)
            except asyncio.TimeoutError:  # not the built-in TimeoutError on Python 3.10
                if await is_disconnected():
                    return
                yield b": keep-alive\n\n"
    finally:
        sampler.unwatch(handle)


def _gradio_app(app: FastAPI) -> Any:
    for route in app.routes:
        inner = getattr(route, "app", None)
        if inner is not None and hasattr(inner, "tokens") and hasattr(inner, "cookie_id"):
            return inner
    return None


def _owner_session(app: FastAPI, request: Request) -> bool:
    """True where no owner login is asked (loopback: the UI lock checked the secret), or the
    request carries a live owner session (Gradio's own check, routes.py `get_current_user`)."""
    gradio = _gradio_app(app)
    if gradio is None:
        return False  # not mounted yet: nothing to show anyway
    if getattr(gradio, "auth", None) is None and getattr(gradio, "auth_dependency", None) is None:
        return True
    cookie = request.cookies.get(f"access-token-{gradio.cookie_id}") or request.cookies.get(
        f"access-token-unsecure-{gradio.cookie_id}"
    )
    return cookie is not None and gradio.tokens.get(cookie) is not None


def add_routes(app: FastAPI, sampler: Any, controller: DashboardController) -> None:
    """Add the live routes to the UI listener's app (before Gradio is mounted at `/`)."""

    @app.get(DASHBOARD_PATH, include_in_schema=False)
    async def dashboard_live(request: Request) -> Response:
        if not _owner_session(app, request):
            return JSONResponse(
                {
                    "error": {
                        "code": "login_required",
                        "message": "Log in to Step Station's UI first (the owner login).",
                    }
                },
                status_code=401,
            )
        return StreamingResponse(
            dashboard_events(sampler, controller, request.is_disconnected),
            media_type="text/event-stream",
            headers={"cache-control": "no-store", "x-accel-buffering": "no"},
        )
