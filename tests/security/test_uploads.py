"""Uploads and images (issue 12, item 7): a size limit at the door, a pixel cap before decoding,
and decoding that never stalls the event loop. The browser's side (a decompression bomb sent
from the page, uploads deleted once the message is stored) is in
tests/browser/test_private_files_and_images.py."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import httpx
import pytest
from browser.chat_page import png
from fixtures.aio import run_async
from PIL import Image

from appliance.chat import client as chat
from appliance.chat import documents as docs
from appliance.chat import history as hist
from appliance.chat.service import ChatService, EngineView
from appliance.errors import BadInputError, EngineError
from appliance.settings import Settings
from ui import chat_render


def _uploads(home: Path) -> list[Path]:
    """Files in the appliance's Gradio folder that are uploads (not the chat's image cache)."""
    gradio = home / "cache" / "gradio"
    return [p for p in gradio.rglob("*") if p.is_file() and "step-station-chat" not in p.parts]


def test_an_upload_over_the_chat_limit_is_refused_at_the_door(appliance, tmp_path):
    """The door is the larger of the image limit and the PDF limit (documents.MAX_UPLOAD_BYTES);
    an image under the door but over its own limit is refused by the chat, unread."""
    app = appliance(settings={"chat": {"max_image_mb": 1}})
    big = tmp_path / "big.png"
    with big.open("wb") as handle:  # the door's limit + 9 bytes
        handle.write(b"\x89PNG\r\n\x1a\n")
        handle.truncate(docs.MAX_UPLOAD_BYTES + 9)
    small = png(tmp_path / "small.png")
    with httpx.Client(base_url=app.base, headers={"Cookie": app.cookie}, timeout=60) as client:
        refused = client.post("gradio_api/upload", files={"files": big.open("rb")})
        assert refused.status_code == 413, refused.text
        assert "maximum allowed size" in refused.text
        # Within the limit: stored, in the appliance's own private folder.
        stored = client.post("gradio_api/upload", files={"files": small.open("rb")})
        assert stored.status_code == 200, stored.text
    (path,) = stored.json()
    assert Path(path).is_relative_to(app.home / "cache" / "gradio")
    assert [p.name for p in _uploads(app.home)] == ["small.png"]  # nothing of the refused one


def test_a_document_named_with_html_and_path_tricks_stays_in_the_upload_folder_as_text(
    appliance, tmp_path
):
    """A file name is the client's to choose: `../` must not place the file outside the
    appliance's upload folder, and HTML or Markdown in it must show as the name, not as markup,
    in the chip the chat draws for the document."""
    app = appliance()
    name = "../../../evil<img src=x onerror=alert(1)>![a](javascript:alert(2)).txt"
    with httpx.Client(base_url=app.base, headers={"Cookie": app.cookie}, timeout=60) as client:
        stored = client.post(
            "gradio_api/upload", files={"files": (name, b"the quarterly numbers\n", "text/plain")}
        )
        assert stored.status_code == 200, stored.text
    (path,) = stored.json()
    upload_area = (app.home / "cache" / "gradio").resolve()
    assert Path(path).resolve().is_relative_to(upload_area)
    escaped = [
        p
        for root in (app.home, tmp_path.parent)
        for p in root.rglob("evil*")
        if not p.resolve().is_relative_to(upload_area)
    ]
    assert escaped == []
    document = docs.counted(docs.read_document(Path(path)), 5, exact=True)
    assert document.text == "the quarterly numbers\n"
    # Gradio keeps the name's last part, less <>:"/\|?*`$!{}; what is left still holds a
    # Markdown link, which the chip draws as text.
    assert document.name == "evilimg src=x onerror=alert(1)[a](javascriptalert(2)).txt"
    chip = chat_render.document_chip(document)
    assert "[a]" not in chip
    assert "](" not in chip
    assert "evilimg src&#61;x onerror&#61;alert&#40;1&#41;&#91;a&#93;&#40;javascriptalert" in chip


def test_image_decoding_runs_off_the_event_loop(tmp_path, monkeypatch):
    """While Pillow decodes (held here until released), the event loop keeps serving."""
    decoding, release = threading.Event(), threading.Event()
    real = chat.prepare_image

    def held(path: Path, **kwargs: object) -> chat.PreparedImage:
        decoding.set()
        if not release.wait(timeout=20):
            raise AssertionError("never released: the event loop was blocked by the decode")
        return real(path, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(chat, "prepare_image", held)
    view = EngineView(ready=False, url="http://127.0.0.1:9", model="m", label="Stopped")
    svc = ChatService(Settings(), hist.History(tmp_path / "h.sqlite3").open(), lambda: view)
    image = png(tmp_path / "a.png")

    async def run() -> None:
        submit = asyncio.create_task(svc.submit(None, "hi", [image], chat.SamplingOptions("low")))
        while not decoding.is_set():  # the loop runs this while the decode is held
            await asyncio.sleep(0.01)
        served = await asyncio.wait_for(asyncio.sleep(0, result="served"), timeout=5)
        assert served == "served"
        assert not submit.done()
        release.set()
        with pytest.raises(EngineError):  # decoded fine; the (stopped) engine refuses
            await submit

    try:
        run_async(run())
    finally:
        release.set()


def test_the_pixel_cap_comes_from_the_header_before_any_decode(tmp_path, monkeypatch):
    bomb = tmp_path / "wide.png"
    Image.new("1", (20_000, 2_500)).save(bomb)  # 50 MP: under Pillow's own limit, over ours
    decoded: list[str] = []
    monkeypatch.setattr(Image.Image, "load", lambda self: decoded.append("load"))
    with pytest.raises(BadInputError, match=r"20,000 x 2,500 pixels \(50 megapixels\)"):
        chat.prepare_image(bomb, max_mb=20)
    assert decoded == []
