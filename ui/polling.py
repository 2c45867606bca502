"""Polling only while a panel is on screen.

A tab's `gr.Timer` starts inactive. A small script (installed once per page through the root
Blocks' load event) watches each registered panel: when the panel is visible (its tab selected and
the browser tab in front, `document.visibilityState`) it clicks the panel's hidden "on" button,
and when it is not, the "off" button; those buttons switch the panel's timers. So a page in a
background browser tab, or a tab the user is not looking at, sends no polls at all.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import gradio as gr

_SCRIPT = """
() => {
  const panel = %r;
  window.__ssPanels = window.__ssPanels || new Set();
  window.__ssPanels.add(panel);
  if (window.__ssShown) return;
  window.__ssShown = {};
  const sync = () => {
    for (const id of window.__ssPanels) {
      const el = document.getElementById(id + '-panel');
      const shown = document.visibilityState === 'visible' && !!el && el.offsetParent !== null;
      if (window.__ssShown[id] === shown) continue;
      const button = document.getElementById(id + (shown ? '-on' : '-off'));
      if (!button) continue;  // the tab was never opened: its timers do not exist yet
      window.__ssShown[id] = shown;
      button.click();
    }
  };
  document.addEventListener('visibilitychange', sync);
  window.addEventListener('focus', sync);
  setInterval(sync, 400);  // tab switches; a page in the background is throttled by the browser
}
"""


def panel(name: str) -> gr.Column:
    """The column that holds a tab's content; its visibility decides whether the tab polls."""
    return gr.Column(elem_id=f"{name}-panel")


def poll_while_visible(
    name: str,
    timers: Sequence[gr.Timer],
    on_show: Callable[..., Any] | None = None,
    inputs: Sequence[Any] = (),
    outputs: Sequence[Any] = (),
) -> None:
    """Activate `timers` while panel `name` is visible; `on_show` refreshes at once when shown."""
    show = gr.Button("show", visible="hidden", elem_id=f"{name}-on")
    hide = gr.Button("hide", visible="hidden", elem_id=f"{name}-off")
    count = len(timers)

    def switch(active: bool) -> Any:
        updates = [gr.Timer(active=active) for _ in range(count)]
        return updates[0] if count == 1 else updates  # one output takes a bare value

    def activate() -> Any:
        return switch(True)

    def deactivate() -> Any:
        return switch(False)

    event = show.click(activate, None, list(timers), queue=False, show_progress="hidden")
    if on_show is not None:
        event.then(
            on_show,
            list(inputs),
            list(outputs),
            show_progress="hidden",
            concurrency_limit=None,
        )
    hide.click(deactivate, None, list(timers), queue=False, show_progress="hidden")
    root = gr.context.Context.root_block
    if root is not None:
        root.load(None, None, None, js=_SCRIPT % name)
