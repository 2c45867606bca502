"""Live values only while a panel is on screen: pushed through one stream per page, or polled.

A tab's `gr.Timer` starts inactive. A small script (installed once per page through the root
Blocks' load event) watches each registered panel: when the panel is visible (its tab selected and
the browser tab in front, `document.visibilityState`) it clicks the panel's hidden "on" button,
and when it is not, the "off" button; those buttons switch the panel's timers. So a page in a
background browser tab, or a tab the user is not looking at, sends no polls at all.

`live_while_visible` is the push variant (issue 16): under the same visibility rule the page keeps
one `EventSource` open to a small stream of the UI listener (ui/live.py) that sends new values
when the server has them, and closes it otherwise. A hidden panel has no stream and gets nothing;
a visible one costs one small SSE message per change instead of one Gradio queue event (a POST,
the event's set-up, processing and its SSE messages: ~13 ms of the appliance's CPU) per poll.
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


_LIVE_SCRIPT = """
() => {
  const panel = %r, url = %r, targets = %s;
  let source = null;
  const write = (event) => {
    const update = JSON.parse(event.data);
    for (const [key, id] of Object.entries(targets)) {
      const el = document.getElementById(id);
      if (el && key in update) el.innerHTML = update[key];
    }
  };
  const sync = () => {
    const el = document.getElementById(panel + '-panel');
    const shown = document.visibilityState === 'visible' && !!el && el.offsetParent !== null;
    if (shown && !source) {
      source = new EventSource(url);
      source.onmessage = write;
      document.body.dataset[panel.replace(/-(.)/g, (_, c) => c.toUpperCase()) + 'Live'] = 'open';
    } else if (!shown && source) {
      source.close();
      source = null;
      document.body.dataset[panel.replace(/-(.)/g, (_, c) => c.toUpperCase()) + 'Live'] = 'closed';
    }
  };
  document.addEventListener('visibilitychange', sync);
  window.addEventListener('focus', sync);
  setInterval(sync, 400);  // tab switches; a page in the background is throttled by the browser
}
"""


def live_while_visible(name: str, url: str, targets: dict[str, str]) -> None:
    """While panel `name` is visible, read the server-sent events of `url` (ui/live.py) and write
    each event's `key: html` into the element of id `targets[key]`; the stream is closed while
    the panel or the browser tab is hidden (then `body[data-<name>-live]` is "closed")."""
    import json

    root = gr.context.Context.root_block
    if root is not None:
        root.load(None, None, None, js=_LIVE_SCRIPT % (name, url, json.dumps(targets)))
