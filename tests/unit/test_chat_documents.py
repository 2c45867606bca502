"""Documents in the chat: text out of PDFs, code, CSV and Markdown; binary and broken files
refused by name; a file too big for the context refused with its numbers before anything is
sent; the text reaching the (real) simulator as a part headed by the file's name; kept with the
conversation, in an edit and in both exports."""

from __future__ import annotations

import json
import os
import urllib.request
from pathlib import Path

import pytest
from fixtures.aio import run_async
from fixtures.pdf_kit import Scan, long_pdf, pdf_bytes, write_pdf

from appliance.chat import client as chat
from appliance.chat import documents as docs
from appliance.chat import history as hist
from appliance.chat.service import ChatService, EngineView, to_openai
from appliance.errors import BadInputError
from appliance.settings import Settings
from ui import chat_render

OPTS = chat.SamplingOptions("low")


def service(url: str) -> ChatService:
    view = EngineView(ready=True, url=url, model="step3p7-flash", label="Ready")
    return ChatService(Settings(), hist.History().open(), lambda: view)


def chat_requests(url: str) -> float:
    """How many chat completions the simulator has finished (its vLLM counter)."""
    text = urllib.request.urlopen(f"{url}/metrics", timeout=5).read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("vllm:request_success_total")
    )


def tokenize(url: str, text: str) -> int:
    body = json.dumps({"model": "step3p7-flash", "prompt": text}).encode()
    request = urllib.request.Request(
        f"{url}/tokenize", data=body, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return int(json.loads(response.read())["count"])


# ---------------------------------------------------------------------------------- reading


def test_a_pdfs_text_is_extracted_page_by_page_and_a_page_without_text_is_named(tmp_path):
    path = write_pdf(
        tmp_path / "report.pdf",
        [["Quarterly revenue rose 12 percent.", "Costs fell."], [], ["Outlook: steady (Q3)."]],
    )
    document = docs.read_document(path)
    assert (document.kind, document.pages, document.empty_pages) == ("PDF", 3, (2,))
    assert document.complete
    assert "--- page 1 ---\nQuarterly revenue rose 12 percent.\nCosts fell." in document.text
    assert "--- page 3 ---\nOutlook: steady (Q3)." in document.text
    assert "page 2" not in document.text
    counted = docs.counted(document, 42, exact=True)
    assert counted.chip() == (
        "report.pdf · PDF, 3 pages · 42 tokens · page 2 has no text and was skipped "
        "(no PDF renderer is installed to send pages as images)"
    )
    # The model gets the file's name as the header of a fenced block, the note after it.
    assert document.part().startswith("File: report.pdf\n```\n--- page 1 ---")
    assert document.part().endswith(
        "Outlook: steady (Q3).\n```\n(report.pdf: page 2 has no text and was skipped)"
    )


def test_scanned_pages_are_sent_as_their_images_within_the_image_limit(tmp_path):
    path = write_pdf(
        tmp_path / "letter.pdf",
        [["Dear owner,"], Scan(color="white"), Scan(color="gray"), [], Scan()],
    )
    document = docs.read_document(path, max_page_images=1)
    assert document.text == "--- page 1 ---\nDear owner,"
    assert document.image_pages == (2,)
    assert document.empty_pages == (3, 4, 5)
    assert document.over_image_limit
    (scan,) = document.page_images
    assert (scan.page, scan.name) == (2, "letter.pdf, page 2")
    assert scan.data.startswith(b"\xff\xd8\xff")  # the scanner's JPEG, as the PDF holds it
    assert chat.prepare_image_data(scan.data, name=scan.name, max_mb=20).width == 850
    assert docs.counted(document, 9, exact=True).chip() == (
        "letter.pdf · PDF, 5 pages · 9 tokens · page 2 has no text and was sent as an image · "
        "pages 3, 4, 5 have no text and were skipped (over the engine's image limit per message)"
    )
    assert document.part().endswith(
        "(letter.pdf: page 2 has no text and was sent as an image; pages 3, 4, 5 have no text "
        "and were skipped)"
    )
    # Stored without the scan's bytes (those are the message's images); read back the same.
    assert "page_images" not in document.to_meta()
    stored = hist.Message(0, 0, "user", "", meta=docs.meta_for([document]))
    assert docs.stored_in(stored)[0].chip() == document.chip()
    # With no image room, a PDF of scans alone cannot be read: said so, not sent empty.
    only_scans = write_pdf(tmp_path / "fax.pdf", [Scan(), Scan()])
    with pytest.raises(BadInputError, match=r"fax\.pdf has no text .* over the engine's image"):
        docs.read_document(only_scans, max_page_images=0)


def test_code_csv_and_markdown_are_read_as_text_in_fences_that_hold(tmp_path):
    code = tmp_path / "main.py"
    code.write_text("def zebra():\n    return 42\n")
    csv = tmp_path / "prices.csv"
    csv.write_bytes(b"item,price\r\napple,1.20\r\n")
    notes = tmp_path / "notes.md"
    notes.write_text("# Notes\n\n````python\nprint('a fence of four')\n````\n")

    py = docs.read_document(code)
    assert py.part() == "File: main.py\n```python\ndef zebra():\n    return 42\n\n```"
    assert docs.read_document(csv).text == "item,price\napple,1.20\n"  # CRLF made plain
    assert docs.read_document(csv).part().startswith("File: prices.csv\n```csv\n")
    md = docs.read_document(notes).part()
    # The file's own four-backtick fence cannot close the block: the block's fence is longer.
    assert md.startswith("File: notes.md\n`````markdown\n# Notes")
    assert md.endswith("````\n\n`````")
    bom = tmp_path / "utf16.txt"
    bom.write_bytes("Grüße".encode("utf-16"))
    assert docs.read_document(bom).text == "Grüße"


def test_binary_and_non_utf8_files_are_refused_by_name(tmp_path):
    binary = tmp_path / "model.txt"
    binary.write_bytes(b"GGUF\x03\x00\x00\x00" + bytes(range(256)))
    with pytest.raises(BadInputError, match=r"model\.txt is not a text file: it holds binary"):
        docs.read_document(binary)
    latin = tmp_path / "old.csv"
    latin.write_bytes("naïve,café\n".encode("latin-1"))
    with pytest.raises(BadInputError, match=r"old\.csv is not UTF-8 text .*offset 2\)") as info:
        docs.read_document(latin)
    assert "Nothing was sent" in (info.value.hint or "")


def test_a_broken_pdf_is_refused_naming_the_file(tmp_path):
    whole = pdf_bytes([["Some text on a page."]] * 3)
    cut = tmp_path / "contract.pdf"
    cut.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(BadInputError, match=r"contract\.pdf is not a readable PDF") as info:
        docs.read_document(cut)
    assert "damaged or incomplete" in str(info.value)
    fake = tmp_path / "slides.pdf"
    fake.write_text("this is not a PDF at all")
    with pytest.raises(BadInputError, match=r"slides\.pdf is not a PDF"):
        docs.read_document(fake)
    scan = write_pdf(tmp_path / "scan.pdf", [[], []])
    with pytest.raises(BadInputError, match=r"scan\.pdf has no text on any of its 2 pages"):
        docs.read_document(scan)


def test_images_and_documents_go_their_own_ways(tmp_path):
    photo = tmp_path / "photo"  # no name ending: its bytes say PNG
    photo.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 32)
    paper = write_pdf(tmp_path / "paper.pdf", [["x"]])
    code = tmp_path / "a.go"
    code.write_text("package main\n")
    named = tmp_path / "fake.png"
    named.write_text("not an image")  # an image's name: the image check refuses it clearly
    assert docs.split_attachments([paper, photo, code, named]) == ([photo, named], [paper, code])


def test_a_huge_text_file_is_never_read(tmp_path, monkeypatch):
    big = tmp_path / "big.txt"
    with big.open("wb") as handle:
        handle.truncate(50 * 1024 * 1024)
    opened: list[str] = []
    real_open = Path.open

    def watched(self: Path, mode: str = "r", *args: object, **kwargs: object) -> object:
        if self == big and "b" in mode:
            opened.append(mode)
        return real_open(self, mode, *args, **kwargs)  # type: ignore[call-overload]

    monkeypatch.setattr(Path, "open", watched)
    document = docs.read_document(big)
    assert not document.complete
    assert document.text == ""
    assert document.estimate() == int(50 * 1024 * 1024 / chat.CHARS_PER_TOKEN) + 1
    assert opened == ["rb"]  # the 1 KiB head only, to tell a PDF from text


def test_the_chip_in_the_bubble_shows_a_hostile_name_as_text():
    document = docs.Document("<img src=x onerror=alert(1)>![a](http://h/x).txt", "text", "hi", 2)
    chip = chat_render.document_chip(docs.counted(document, 3, exact=True))
    assert "<img" not in chip
    assert "](" not in chip
    assert chip.startswith('<div class="doc-chip">&#60;img src&#61;x onerror&#61;alert&#40;1')


def test_undo_gets_each_document_back_as_a_file_named_safely(tmp_path):
    def name(document_name: str, kind: str = "text") -> str:
        return docs.file_name_for(docs.Document(document_name, kind, "x", 1))

    assert name("main.py") == "main.py"
    assert name("report.pdf", "PDF") == "report.pdf.txt"  # its text is what comes back
    assert name("../../etc/passwd") == "passwd.txt"
    assert name("..") == "document.txt"
    assert name(".bashrc") == "bashrc.txt"
    assert name("a<b>\\c|d.md") == "a_b__c_d.md"
    folder = tmp_path / "cache"
    document = docs.Document("../notes.md", "text", "# Notes\n", 8)
    path = chat_render.document_file(document, folder)
    assert path.parent.parent == folder
    assert (path.name, path.read_text()) == ("notes.md", "# Notes\n")
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert chat_render.document_file(document, folder) == path  # written once


# ---------------------------------------------------------------------------- the chat flow


def test_a_pdf_and_a_code_file_reach_the_engine_and_stay_with_the_conversation(simulator, tmp_path):
    url = simulator()
    svc = service(url)
    pdf = write_pdf(tmp_path / "report.pdf", [["Zebra sales doubled in March."]])
    code = tmp_path / "main.py"
    code.write_text("def gnu():\n    return 'antelope'\n")

    async def run() -> tuple[str, chat.Reply]:
        turn = await svc.submit(None, "Summarise both", [pdf, code], OPTS)
        last = None
        async for reply in svc.respond(turn.conversation_id, OPTS):
            last = reply
        assert last is not None
        return turn.conversation_id, last

    cid, reply = run_async(run())
    # The simulator quotes the start of the last user message: the PDF's block comes first.
    assert 'wrote: "File: report.pdf ``` Zebra sales doubled in March. ``` File: main.py' in (
        reply.reasoning
    )
    conversation = svc.history.get_conversation(cid)
    assert conversation.title == "Summarise both"
    user = conversation.messages[0]
    stored = docs.stored_in(user)
    assert [d.name for d in stored] == ["report.pdf", "main.py"]
    # Counted by the engine's tokenizer (the simulator's /tokenize), not estimated.
    assert all(d.exact for d in stored)
    assert stored[1].tokens == tokenize(url, stored[1].part())
    (sent,) = to_openai([user])
    assert [p["text"] for p in sent["content"]] == [
        stored[0].part(),
        stored[1].part(),
        "Summarise both",
    ]
    # The prompt the engine counted holds both files.
    assert reply.usage is not None
    assert reply.usage.prompt_tokens > stored[0].tokens + stored[1].tokens

    exported = json.loads(svc.history.export_json(cid))
    (message, _reply) = exported["conversations"][0]["messages"]
    assert [d["name"] for d in message["meta"]["documents"]] == ["report.pdf", "main.py"]
    assert "Zebra sales doubled in March." in message["meta"]["documents"][0]["text"]
    markdown = svc.history.export_markdown(cid)
    assert "*[document: main.py · " in markdown
    assert "File: main.py\n```python\ndef gnu():\n    return 'antelope'\n\n```" in markdown


def test_a_scanned_pdf_reaches_the_engine_as_images(simulator, tmp_path):
    url = simulator()
    svc = service(url)
    fax = write_pdf(tmp_path / "fax.pdf", [Scan(), Scan(size=(400, 600), color="gray")])

    async def run() -> tuple[str, chat.Reply]:
        turn = await svc.submit(None, "What does the fax say?", [fax], OPTS)
        last = None
        async for reply in svc.respond(turn.conversation_id, OPTS):
            last = reply
        assert last is not None
        return turn.conversation_id, last

    cid, reply = run_async(run())
    assert "There are 2 image(s)" in reply.reasoning  # both pages reached the engine
    (user, _bot) = svc.history.get_conversation(cid).messages
    assert [i.name for i in user.images] == ["fax.pdf, page 1", "fax.pdf, page 2"]
    (document,) = docs.stored_in(user)
    assert document.image_pages == (1, 2)


def test_the_chips_before_sending_count_with_the_engine_or_say_estimate(simulator, tmp_path):
    url = simulator()
    code = tmp_path / "main.py"
    code.write_text("def gnu():\n    return 'antelope'\n")
    broken = tmp_path / "<u>bad.pdf"
    broken.write_bytes(pdf_bytes([["text"]])[:100])
    photo = tmp_path / "photo.png"
    photo.write_bytes(b"\x89PNG\r\n\x1a\n")  # images are the send's to check
    serving = service(url)
    stopped = ChatService(
        Settings(),
        hist.History().open(),
        lambda: EngineView(ready=False, url=url, model="step3p7-flash", label="Stopped"),
    )

    async def run() -> tuple[list[docs.Preview], list[docs.Preview]]:
        files = [code, broken, photo]
        return await serving.preview_documents(files), await stopped.preview_documents(files)

    exact, estimated = run_async(run())
    assert [p.name for p in exact] == ["main.py", "<u>bad.pdf"]
    assert exact[0].document is not None
    assert exact[0].document.tokens == tokenize(url, exact[0].document.part())
    assert exact[0].document.chip() == f"main.py · {exact[0].document.tokens} tokens"
    assert estimated[0].document is not None
    assert estimated[0].document.chip().startswith("main.py · about ")
    assert estimated[0].document.chip().endswith(" tokens (estimate)")
    assert exact[1].problem.startswith("<u>bad.pdf is not a readable PDF")
    line = chat_render.attachment_chips(exact)
    assert '<div class="doc-chip doc-problem">&#60;u&#62;bad.pdf is not' in line
    assert "<u>" not in line
    assert serving.history.list_conversations() == []  # a preview stores nothing


def test_a_document_read_for_its_chip_is_not_read_again_to_send(simulator, tmp_path, monkeypatch):
    url = simulator()
    svc = service(url)
    pdf = write_pdf(tmp_path / "report.pdf", [["Zebra sales doubled in March."]])
    reads: list[str] = []
    real = docs.read_document

    def counted(path: Path, **kwargs: int) -> docs.Document:
        reads.append(path.name)
        return real(path, **kwargs)

    monkeypatch.setattr(docs, "read_document", counted)

    async def run() -> None:
        await svc.preview_documents([pdf])
        await svc.submit(None, "Summarise", [pdf], OPTS)
        pdf.write_bytes(pdf_bytes([["Changed since."]]))  # another file: read again
        await svc.preview_documents([pdf])

    run_async(run())
    assert reads == ["report.pdf", "report.pdf"]


def test_an_edit_keeps_the_documents(simulator, tmp_path):
    url = simulator()
    svc = service(url)
    code = tmp_path / "calc.rs"
    code.write_text('fn main() { println!("okapi"); }\n')

    async def run() -> str:
        turn = await svc.submit(None, "Explain", [code], OPTS)
        async for _ in svc.respond(turn.conversation_id, OPTS):
            pass
        await svc.prepare_edit(turn.conversation_id, 0, "Explain briefly", OPTS)
        return turn.conversation_id

    cid = run_async(run())
    (user,) = svc.history.get_conversation(cid).messages
    assert user.content == "Explain briefly"
    assert [d.name for d in docs.stored_in(user)] == ["calc.rs"]


def test_a_300_page_pdf_is_refused_with_its_numbers_and_nothing_is_sent(simulator, tmp_path):
    url = simulator()  # the model's own context, 256K
    svc = service(url)
    book = long_pdf(tmp_path / "book.pdf", pages=300, lines=60)

    async def run() -> None:
        await svc.submit(None, "Summarise the book", [book], OPTS)

    with pytest.raises(docs.DocumentTooLongError) as info:
        run_async(run())
    message = str(info.value)
    # Either every page was read and counted, or the reading stopped once far over the limit.
    assert message.startswith("book.pdf ")
    assert "but the model's context has 261," in message
    assert "(262,144 in all; about " in message
    assert "256 kept for the answer" in message
    assert "Nothing was sent" in (info.value.hint or "")
    assert svc.history.list_conversations() == []  # nothing stored
    assert chat_requests(url) == 0  # nothing sent


def test_a_300_page_pdf_stops_being_read_once_far_over_a_small_context(simulator, tmp_path):
    url = simulator("--max-model-len", "32768")
    svc = service(url)
    book = long_pdf(tmp_path / "book.pdf", pages=300, lines=60)

    async def run() -> None:
        assert await svc.context_length() == 32768  # the chat's context line asks first
        await svc.submit(None, "Summarise the book", [book], OPTS)

    with pytest.raises(docs.DocumentTooLongError) as info:
        run_async(run())
    message = str(info.value)
    assert message.startswith("book.pdf has 300 pages and its first ")
    first = int(message.split("its first ")[1].split(" ")[0])
    assert 10 < first < 300  # about twice the context was read, not the whole book
    assert "are already about " in message
    assert "but the model's context has 32," in message
    assert svc.history.list_conversations() == []


def test_a_50_mb_text_file_is_refused_with_its_numbers_and_nothing_is_sent(simulator, tmp_path):
    url = simulator()
    svc = service(url)
    big = tmp_path / "server.log"
    line = b"2026-12-06 05:00:00 INFO request served in 12 ms\n"
    with big.open("wb") as handle:
        for _ in range(50 * 1024 * 1024 // len(line) + 1):
            handle.write(line)
    size_mib = os.path.getsize(big) / 1024 / 1024

    async def run() -> None:
        await svc.submit(None, "What went wrong?", [big], OPTS)

    with pytest.raises(docs.DocumentTooLongError) as info:
        run_async(run())
    tokens = int(os.path.getsize(big) / chat.CHARS_PER_TOKEN) + 1
    assert str(info.value).startswith(
        f"server.log is {size_mib:.1f} MiB, about {tokens:,} tokens (estimated from its size), "
        "but the model's context has 261,"
    )
    assert svc.history.list_conversations() == []
    assert chat_requests(url) == 0


def test_documents_that_fit_alone_but_not_together_are_refused(simulator, tmp_path):
    url = simulator("--max-model-len", "4096")
    svc = service(url)
    words = " ".join(f"word{n}" for n in range(1500))  # ~1,500+ tokens each
    first, second, third = (tmp_path / f"{n}.txt" for n in ("a", "b", "c"))
    for path in (first, second, third):
        path.write_text(words)

    async def run() -> None:
        await svc.submit(None, "Compare", [first, second, third], OPTS)

    with pytest.raises(docs.DocumentTooLongError, match=r"^c\.txt is \d[\d,]* tokens, but"):
        run_async(run())
    assert svc.history.list_conversations() == []
