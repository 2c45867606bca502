"""Files private to the user (issue 12, item 3): another account on the machine reads nothing.

A real `step-station up --demo` is started under umask 022 (a shell's usual one) and used the way
an owner does: a chat message with an image through the page, an export, an API key made with
the CLI, a request through the gateway. Then every folder under its config, data and cache
folders (Gradio's temporary folder is one of them) must be 0700 and every file 0600.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import urllib.request
from pathlib import Path

from browser.chat_page import attach, open_accordion, open_chat, png, send, wait_for_replies

REPO = Path(__file__).resolve().parents[2]


def _loose(root: Path) -> list[str]:
    """Paths under `root` that group or others may use, with their modes."""
    found: list[str] = []
    for folder, dirs, files in os.walk(root):
        for name in [*dirs, *files]:
            path = Path(folder) / name
            info = path.lstat()
            if stat.S_ISLNK(info.st_mode):
                continue
            if stat.S_IMODE(info.st_mode) & 0o077:
                found.append(f"{path.relative_to(root.parent)} {stat.S_IMODE(info.st_mode):o}")
    if stat.S_IMODE(root.stat().st_mode) & 0o077:
        found.append(f"{root.name} {stat.S_IMODE(root.stat().st_mode):o}")
    return found


def test_every_folder_and_file_the_appliance_writes_is_private(appliance, page, tmp_path):
    previous = os.umask(0o022)  # the child inherits it: the appliance must not rely on it
    try:
        app = appliance()
    finally:
        os.umask(previous)
    home = app.home

    # The owner chats with an image, exports the chat, makes a key, and a client uses the API.
    open_chat(page, app.url)
    attach(page, [png(tmp_path / "photo.png", (200, 150), "teal")])
    send(page, "What is in this picture?")
    wait_for_replies(page, 1)
    open_accordion(page, "#manage")
    page.locator("#export-one").click()
    page.wait_for_selector("#export-file a[href]")
    made = subprocess.run(
        [sys.executable, "-m", "appliance", "keys", "create", "laptop", "--json"],
        cwd=REPO,
        env=app.env,
        capture_output=True,
        text=True,
        timeout=60,
        umask=0o022,
        check=True,
    )
    key = json.loads(made.stdout)["key"]
    request = urllib.request.Request(
        f"http://127.0.0.1:{app.api_port}/v1/chat/completions",
        data=json.dumps(
            {"model": "step3p7-flash", "messages": [{"role": "user", "content": "hi"}]}
        ).encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"},
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        assert response.status == 200

    # Gradio's temporary folder is the appliance's own, not the shared /tmp/gradio: the image
    # shown in the chat was written there.
    gradio = home / "cache" / "gradio"
    assert list((gradio / "step-station-chat").glob("*.png")), "the chat's image is not there"
    written = {p.name for folder in ("config", "data", "cache") for p in (home / folder).rglob("*")}
    expected = {"settings.toml", "history.sqlite3", "keys.json", "gateway-access.log"}
    assert expected <= written, f"missing: {expected - written}"
    assert any(name.startswith("step-station-conversation-") for name in written)  # the export

    loose = [entry for folder in ("config", "data", "cache") for entry in _loose(home / folder)]
    assert not loose, "readable by group or others:\n" + "\n".join(loose)
