"""A web page on another origin, opened in the owner's own browser, tries to drive Step Station.

The owner has opened the UI (the browser holds its cookie), then visits a page served by the test
from a second loopback address (127.0.0.2: another site to the browser, and as close to the
appliance as a page can be). The page tries what an attacker would: Gradio's queue and named API
with the owner's cookie, a plain form post, `no-cors` requests (which need no preflight) to the
UI and to the gateway, CORS reads of the model list. Nothing changes: no key, no setting, no
prompt reaches the engine, and the page reads nothing back.
"""

from __future__ import annotations

import http.server
import json
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

EVIL_PAGE = """<!doctype html><html><body><h1>cute cats</h1>
<form id="f" method="POST" target="sink" enctype="text/plain"
      action="{ui}gradio_api/call/{api_name}">
<input name='{{"data":["form-key","' value='"]}}'></form>
<iframe name="sink"></iframe>
<script>
const ui = "{ui}", api = "{api}", fn = {fn_index};
const join = JSON.stringify({{data: ["rebind-key", null], fn_index: fn, session_hash: "evil123",
                             event_data: null, trigger_id: null}});
const chat = JSON.stringify({{model: "step3p7-flash", max_tokens: 4,
                             messages: [{{role: "user", content: "exfiltrate"}}]}});
async function attempt(name, url, init) {{
  try {{
    const r = await fetch(url, init);
    let text = "";
    try {{ text = await r.text(); }} catch (e) {{ text = "unreadable"; }}
    return [name, r.type, r.status, text.slice(0, 200)];
  }} catch (e) {{ return [name, "error", 0, String(e)]; }}
}}
window.results = (async () => {{
  document.getElementById("f").submit();
  const out = [];
  out.push(await attempt("queue no-cors", ui + "gradio_api/queue/join",
    {{method: "POST", mode: "no-cors", credentials: "include",
      headers: {{"Content-Type": "text/plain"}}, body: join}}));
  out.push(await attempt("queue cors", ui + "gradio_api/queue/join",
    {{method: "POST", credentials: "include",
      headers: {{"Content-Type": "application/json"}}, body: join}}));
  out.push(await attempt("config", ui + "config", {{credentials: "include"}}));
  out.push(await attempt("events", ui + "gradio_api/queue/data?session_hash=evil123",
    {{credentials: "include"}}));
  out.push(await attempt("chat no-cors", api + "v1/chat/completions",
    {{method: "POST", mode: "no-cors", headers: {{"Content-Type": "text/plain"}}, body: chat}}));
  out.push(await attempt("chat cors", api + "v1/chat/completions",
    {{method: "POST", headers: {{"Content-Type": "application/json"}}, body: chat}}));
  out.push(await attempt("models", api + "v1/models", {{}}));
  await new Promise(r => setTimeout(r, 1500));  // the form's post lands meanwhile
  return out;
}})();
</script></body></html>"""


class _Evil(http.server.BaseHTTPRequestHandler):
    page = b""

    def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(self.page)))
        self.end_headers()
        self.wfile.write(self.page)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def evil_site() -> Iterator[tuple[str, type[_Evil]]]:
    handler = type("EvilHandler", (_Evil,), {})
    server = http.server.ThreadingHTTPServer(("127.0.0.2", 0), handler)  # the kernel picks
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.2:{server.server_address[1]}/", handler
    server.shutdown()
    server.server_close()


def test_a_page_from_another_origin_changes_nothing(appliance, page, evil_site) -> None:
    app = appliance()
    page.goto(app.url)  # the owner opened the UI: the browser holds its cookie
    page.wait_for_selector("#tabs")
    with httpx.Client(base_url=app.base, headers={"Cookie": app.cookie}) as owner:
        deps = owner.get("/config").json()["dependencies"]
    create = next(d for d in deps if str(d.get("api_name", "")).startswith("on_create"))
    keys_file = app.home / "data" / "keys.json"
    settings_file = app.home / "config" / "settings.toml"
    before = (
        keys_file.read_text() if keys_file.exists() else "",
        settings_file.read_text(),
        app.gauge("vllm:prompt_tokens_total"),
    )

    url, handler = evil_site
    handler.page = EVIL_PAGE.format(
        ui=app.base,
        api=f"http://127.0.0.1:{app.api_port}/",
        api_name=create["api_name"],
        fn_index=create["id"],
    ).encode()
    page.goto(url)
    results = page.evaluate("() => window.results")
    by_name = {name: (kind, status, text) for name, kind, status, text in results}
    # no-cors answers are opaque: the page sees neither status nor body
    assert by_name["queue no-cors"][:2] == ("opaque", 0), by_name
    assert by_name["chat no-cors"][:2] == ("opaque", 0), by_name
    # CORS reads fail: no Access-Control-Allow-Origin anywhere
    for name in ("queue cors", "config", "events", "chat cors", "models"):
        assert by_name[name][0] == "error", (name, by_name[name])

    after = (
        keys_file.read_text() if keys_file.exists() else "",
        settings_file.read_text(),
        app.gauge("vllm:prompt_tokens_total"),
    )
    assert after == before
    assert "rebind-key" not in json.dumps(after)
    assert "form-key" not in json.dumps(after)
    # The owner's own page still works after all that.
    page.goto(app.url)
    page.wait_for_selector("#tabs")


FRAMING_PAGE = """<!doctype html><html><body><h1>win a prize: click the button</h1>
<iframe id="ui" src="{ui}" style="opacity:0.01;position:absolute;top:0;left:0"
        width="1200" height="800"></iframe></body></html>"""


def test_a_page_from_another_origin_cannot_frame_the_ui(appliance, page, evil_site) -> None:
    """Clickjacking: a page lays the owner's UI, invisible, under its own "button". The UI's
    `frame-ancestors 'none'` (a header: the page's <meta> CSP cannot carry it) stops the frame
    from rendering, even with the owner's cookie in the browser."""
    app = appliance()
    page.goto(app.url)  # the owner opened the UI: the browser holds its cookie
    page.wait_for_selector("#tabs")
    url, handler = evil_site
    handler.page = FRAMING_PAGE.format(ui=app.base).encode()
    page.goto(url)
    page.wait_for_load_state("load")
    frame = page.frame_locator("#ui")
    # the framed document never becomes the UI: Chromium swaps in its error page
    assert page.locator("#ui").count() == 1
    assert frame.locator("#tabs").count() == 0
    framed = next(f for f in page.frames if f is not page.main_frame)
    assert not framed.url.startswith(app.base), framed.url
    # the same UI opened directly still works
    page.goto(app.url)
    page.wait_for_selector("#tabs")
