"""Documents attached to a chat message: PDF, text, Markdown, code and CSV files as text.

No gradio here. A document is read once, when its message is checked (`read_documents`, in a
worker thread), and stored with the message: its extracted text and token count live in the
message's `meta["documents"]`, so the history, its JSON export and an edit keep it. What goes to
the engine is one text part per document, a fenced block headed by the file's name
(`Document.part`), ahead of what the owner typed, so the model can tell the files apart.

Limits, so a big file never sits in memory twice or stalls the page:

- text files: at most `MAX_TEXT_BYTES` are read; a bigger file is refused from its size alone
  (its tokens estimated from its bytes) and never opened;
- PDFs: at most `MAX_PDF_BYTES` and `MAX_PDF_PAGES` pages; text is extracted page by page with
  pypdf (pure Python) and extraction stops once the text is far more than the context can hold;
- a page without text that is a scan (an image over the page) is sent as that image, within
  the engine's image limit per prompt; any other page without text is skipped and named in the
  chip: drawing a page as an image needs a PDF renderer (PDFium, MuPDF), a heavy native
  dependency this appliance does not ship.
"""

from __future__ import annotations

import codecs
import re
import time
import zlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from pypdf import PageObject, PdfReader
from pypdf.errors import PyPdfError

from appliance.chat import client as chat
from appliance.chat import history as hist
from appliance.errors import BadInputError
from appliance.units import fmt_bytes

NATIVE_CONTEXT = 262_144  # Step-3.7-Flash's own context length (256K)
MAX_TEXT_BYTES = 4 * 1024 * 1024  # 4 MiB: over a million tokens, four times the whole context
MAX_PDF_BYTES = 64 * 1024 * 1024
MAX_PDF_PAGES = 1000
# pypdf is pure Python and its time is not bounded by a file's size: a 1 KB page that draws one
# form thousands of times is parsed again at each use (minutes to hours). Reading stops here.
PDF_TIME_BUDGET_S = 120.0
# The upload limit at the door (Gradio's max_file_size): a PDF's cap. A text file between
# MAX_TEXT_BYTES and this is refused with its token numbers, unread.
MAX_UPLOAD_BYTES = MAX_PDF_BYTES
# Extraction stops past this many characters: twice the native context even at the estimate's
# conservative 3 characters a token, so whatever was cut could never have fitted.
MAX_TEXT_CHARS = int(2 * NATIVE_CONTEXT * chat.CHARS_PER_TOKEN)

PDF, TEXT = "PDF", "text"
META_KEY = "documents"  # where a user message's meta keeps its documents

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".gif", ".webp", ".bmp"})
# File name endings the chat takes as documents, with the language a fenced block names.
LANGUAGES: dict[str, str] = {
    ".pdf": "",
    ".txt": "",
    ".text": "",
    ".log": "",
    ".md": "markdown",
    ".markdown": "markdown",
    ".rst": "rst",
    ".csv": "csv",
    ".tsv": "tsv",
    ".json": "json",
    ".jsonl": "json",
    ".yaml": "yaml",
    ".yml": "yaml",
    ".toml": "toml",
    ".ini": "ini",
    ".cfg": "ini",
    ".xml": "xml",
    ".html": "html",
    ".htm": "html",
    ".css": "css",
    ".tex": "latex",
    ".sql": "sql",
    ".py": "python",
    ".ipynb": "json",
    ".js": "javascript",
    ".mjs": "javascript",
    ".jsx": "jsx",
    ".ts": "typescript",
    ".tsx": "tsx",
    ".java": "java",
    ".kt": "kotlin",
    ".scala": "scala",
    ".c": "c",
    ".h": "c",
    ".cc": "cpp",
    ".cpp": "cpp",
    ".hpp": "cpp",
    ".cs": "csharp",
    ".go": "go",
    ".rs": "rust",
    ".rb": "ruby",
    ".php": "php",
    ".swift": "swift",
    ".lua": "lua",
    ".r": "r",
    ".pl": "perl",
    ".sh": "bash",
    ".bash": "bash",
    ".zsh": "bash",
    ".ps1": "powershell",
    ".dockerfile": "dockerfile",
    ".proto": "protobuf",
}
DOCUMENT_SUFFIXES = frozenset(LANGUAGES)
# What the upload control accepts (Gradio checks it in the browser and again on the server).
FILE_TYPES = ["image", *sorted(DOCUMENT_SUFFIXES)]

# pypdf on a damaged file raises its own errors, and, deep in a malformed object, plain Python
# ones; each means the same to the owner: this PDF cannot be read.
_PDF_ERRORS = (
    PyPdfError,
    OSError,
    ValueError,
    KeyError,
    IndexError,
    TypeError,
    AttributeError,
    AssertionError,
    RecursionError,
    zlib.error,
)
# Tokens the engine's tokenizer takes as turn or image markers wherever they stand in a text
# (Hugging Face tokenizers split added special tokens out of any string): ChatML's `<|im_end|>`
# and its kin (Llama's `<|eot_id|>`, gpt-oss's `<|start|>`), DeepSeek's with fullwidth bars
# (U+FF5C), and Step's image tokens. In a file they would end the owner's turn and open one the
# file writes (vLLM refuses a message holding `<im_patch>` outright). A zero-width space after
# the `<` leaves the words and breaks the token.
_SPECIAL_TOKEN = re.compile(
    r"<(?=[|\uff5c][^\s<>|\uff5c]{1,64}[|\uff5c]>"
    r"|(?:im_patch|im_start|im_end|patch_start|patch_end|patch_newline)>)"
)
_BOMS = (
    (codecs.BOM_UTF32_LE, "utf-32"),
    (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
    (codecs.BOM_UTF8, "utf-8-sig"),
)


class _TooSlowError(BaseException):
    """The PDF's time budget ran out (raised from pypdf's operator callback). A BaseException:
    pypdf logs and skips any Exception from a form it draws, and this must end the reading."""


class DocumentTooLongError(chat.ContextTooLongError):
    """An attached document does not fit what is left of the model's context."""


@dataclass(frozen=True)
class PageImage:
    """A PDF page without text sent as the image it is (a scan), as the PDF holds it."""

    page: int
    name: str  # `scan.pdf, page 3`
    data: bytes = field(repr=False)


@dataclass(frozen=True)
class Document:
    """One attached file as the model reads it, and what its chip says."""

    name: str
    kind: str  # PDF | TEXT
    text: str
    size: int  # bytes of the file
    pages: int = 0  # a PDF's page count
    pages_read: int = 0  # pages whose text was extracted (all of them unless cut short)
    empty_pages: tuple[int, ...] = ()  # 1-based: PDF pages with no text, skipped
    complete: bool = True  # False: too big, only part of it (or none) was read
    tokens: int = 0  # set once counted (exact from the engine, or an estimate)
    exact: bool = False
    image_pages: tuple[int, ...] = ()  # 1-based: pages without text sent as their scan
    over_image_limit: bool = False  # some skipped pages were scans past the image limit
    # The scans themselves: they go with the message's images, never into its meta.
    page_images: tuple[PageImage, ...] = field(default=(), repr=False, compare=False)

    @property
    def suffix(self) -> str:
        return Path(self.name).suffix.lower()

    def part(self) -> str:
        """The text part the engine gets: a fenced block headed by the file's name."""
        fence = _fence_for(self.text)
        language = LANGUAGES.get(self.suffix, "")
        name = defused(" ".join(self.name.splitlines()))  # one line: no header of its own
        block = f"File: {name}\n{fence}{language}\n{defused(self.text)}\n{fence}"
        notes = self.page_notes(why=False)  # after the text: the name and the text lead
        return block + (f"\n({name}: {'; '.join(notes)})" if notes else "")

    def page_notes(self, *, why: bool) -> list[str]:
        """What happened to the pages without text."""
        notes = []
        if self.image_pages:
            notes.append(
                _pages(
                    self.image_pages,
                    "has no text and was sent as an image",
                    "have no text and were sent as images",
                )
            )
        if self.empty_pages:
            note = _pages(
                self.empty_pages, "has no text and was skipped", "have no text and were skipped"
            )
            if why and self.over_image_limit:
                note += " (over the engine's image limit per message)"
            elif why:
                note += " (no PDF renderer is installed to send pages as images)"
            notes.append(note)
        return notes

    def estimate(self) -> int:
        """Tokens by the chat's conservative estimate (over-counts ordinary text)."""
        if not self.complete and self.kind == TEXT and not self.text:
            return int(self.size / chat.CHARS_PER_TOKEN) + 1  # unread: from its size
        return int(len(self.part()) / chat.CHARS_PER_TOKEN) + 1

    def token_text(self) -> str:
        if self.exact:
            return f"{self.tokens:,} tokens"
        return f"about {self.tokens:,} tokens (estimate)"

    def chip(self) -> str:
        """What the owner sees for it: `report.pdf · PDF, 3 pages · 1,234 tokens · page 2 ...`."""
        parts = [self.name]
        if self.kind == PDF:
            parts.append(f"PDF, {self.pages:,} page{'s' if self.pages != 1 else ''}")
        parts.append(self.token_text())
        parts.extend(self.page_notes(why=True))
        return " · ".join(parts)

    def to_meta(self) -> dict[str, Any]:
        data = asdict(self)
        del data["page_images"]  # stored as the message's images
        data["empty_pages"] = list(self.empty_pages)
        data["image_pages"] = list(self.image_pages)
        return data


def file_name_for(document: Document) -> str:
    """A safe file name to hold the document's text again (Undo puts a message back into the
    box): its last path part, only letters, digits and `._-()` and spaces kept, never hidden; a
    PDF (or a name the chat would not take) gets `.txt` added, as its text is what it holds."""
    base = "".join(
        c if c.isalnum() or c in "._-() " else "_" for c in document.name.rsplit("/", 1)[-1]
    ).strip(" .")
    base = base or "document"
    suffix = Path(base).suffix.lower()
    if document.kind == PDF or suffix == ".pdf" or suffix not in DOCUMENT_SUFFIXES:
        base += ".txt"
    return base[-120:]


@dataclass(frozen=True)
class Preview:
    """A file attached but not yet sent: the document it will be, or why it cannot go."""

    name: str
    document: Document | None = None
    problem: str = ""


def _pages(pages: Sequence[int], one: str, many: str) -> str:
    """`page 3 has ...`, or `pages 2, 5 have ...` (the first ten named)."""
    shown = ", ".join(str(p) for p in pages[:10]) + (" ..." if len(pages) > 10 else "")
    return f"page {shown} {one}" if len(pages) == 1 else f"pages {shown} {many}"


def defused(text: str) -> str:
    """`text` with every special token the engine would read as a turn or image marker broken
    (`<|im_end|>` -> `<\u200b|im_end|>`), so a file cannot end the owner's turn."""
    return _SPECIAL_TOKEN.sub("<\u200b", text)


def _fence_for(text: str) -> str:
    """A backtick fence longer than any run of backticks in the text (CommonMark's rule), so a
    Markdown file's own code blocks cannot close the block early."""
    longest = run = 0
    for char in text:
        run = run + 1 if char == "`" else 0
        longest = max(longest, run)
    return "`" * max(3, longest + 1)


# --------------------------------------------------------------------------------- storing


def stored_in(message: hist.Message) -> list[Document]:
    """The documents a stored message carries (none for most messages)."""
    entries = message.meta.get(META_KEY) if message.meta else None
    if not isinstance(entries, list):
        return []
    found: list[Document] = []
    for entry in entries:
        if not isinstance(entry, dict):
            continue
        found.append(
            Document(
                name=str(entry.get("name") or "document"),
                kind=str(entry.get("kind") or TEXT),
                text=str(entry.get("text") or ""),
                size=int(entry.get("size") or 0),
                pages=int(entry.get("pages") or 0),
                pages_read=int(entry.get("pages_read") or 0),
                empty_pages=tuple(int(p) for p in entry.get("empty_pages") or ()),
                tokens=int(entry.get("tokens") or 0),
                exact=bool(entry.get("exact")),
                image_pages=tuple(int(p) for p in entry.get("image_pages") or ()),
                over_image_limit=bool(entry.get("over_image_limit")),
            )
        )
    return found


def meta_for(documents: Sequence[Document]) -> dict[str, Any]:
    """A user message's meta holding its documents (empty when there are none)."""
    return {META_KEY: [d.to_meta() for d in documents]} if documents else {}


# --------------------------------------------------------------------------------- reading


def is_image(path: Path) -> bool:
    """Whether an attachment goes the image way: an image's name, or an image's bytes."""
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return True
    if path.suffix.lower() in DOCUMENT_SUFFIXES:
        return False
    try:
        with path.open("rb") as handle:
            head = handle.read(16)
    except OSError:
        return False
    return chat.sniff_image(head) is not None


def split_attachments(paths: Sequence[Path]) -> tuple[list[Path], list[Path]]:
    """(images, documents) in the order they were attached."""
    images = [Path(p) for p in paths if is_image(Path(p))]
    documents = [Path(p) for p in paths if not is_image(Path(p))]
    return images, documents


def read_documents(
    paths: Sequence[Path], *, max_chars: int = MAX_TEXT_CHARS, max_page_images: int = 0
) -> list[Document]:
    """Read each attachment; scanned pages share `max_page_images` in the order they come."""
    out: list[Document] = []
    for path in paths:
        document = read_document(Path(path), max_chars=max_chars, max_page_images=max_page_images)
        max_page_images -= len(document.page_images)
        out.append(document)
    return out


def read_document(
    path: Path,
    *,
    name: str | None = None,
    max_chars: int = MAX_TEXT_CHARS,
    max_page_images: int = 0,
    time_budget_s: float = PDF_TIME_BUDGET_S,
) -> Document:
    """Read one attachment as text (and up to `max_page_images` scanned pages as their
    images); BadInputError (naming the file) when it cannot be, or a PDF takes longer than
    `time_budget_s`."""
    name = name or path.name
    try:
        size = path.stat().st_size
        with path.open("rb") as handle:
            head = handle.read(1024)
    except OSError as err:
        raise BadInputError(
            f"{name} could not be read ({err.strerror}).", hint="Attach it again."
        ) from err
    if path.suffix.lower() == ".pdf" or head.startswith(b"%PDF-"):
        deadline = time.monotonic() + time_budget_s
        try:
            return _read_pdf(path, name, size, head, max_chars, max_page_images, deadline)
        except _TooSlowError as err:
            raise BadInputError(
                f"{name} took more than {time_budget_s:g} s to read and was stopped ({err}): "
                "it is far slower to read than its size says, as a PDF built to stall a reader "
                "is.",
                hint="Open it in a PDF viewer and print it to PDF again, or attach the pages you "
                "need. Nothing was sent.",
            ) from None
    return _read_text(path, name, size, max_chars)


def _read_pdf(  # noqa: PLR0913 - one reading's inputs
    path: Path,
    name: str,
    size: int,
    head: bytes,
    max_chars: int,
    max_page_images: int,
    deadline: float,
) -> Document:
    if b"%PDF-" not in head:
        raise BadInputError(
            f"{name} is not a PDF (its bytes do not start like one, whatever its name says).",
            hint="Attach the real PDF file. Nothing was sent.",
        )
    if size > MAX_PDF_BYTES:
        raise BadInputError(
            f"{name} is {fmt_bytes(size)}; PDFs may be at most {fmt_bytes(MAX_PDF_BYTES)}.",
            hint="Attach a smaller PDF, or the pages you need. Nothing was sent.",
        )
    try:
        reader = PdfReader(path)
        if reader.is_encrypted and not reader.decrypt(""):
            raise BadInputError(
                f"{name} is password-protected; its text cannot be read.",
                hint="Remove the password (print to PDF) and attach it again. Nothing was sent.",
            )
        count = len(reader.pages)
    except _PDF_ERRORS as err:
        raise _broken(name, err) from err
    if count > MAX_PDF_PAGES:
        raise BadInputError(
            f"{name} has {count:,} pages; the chat reads PDFs of at most {MAX_PDF_PAGES:,} pages.",
            hint="Attach the pages you need (split the PDF). Nothing was sent.",
        )
    texts: list[str] = []
    empty: list[int] = []
    scans: list[PageImage] = []
    over_limit = False
    chars = 0
    for index in range(count):
        number = index + 1

        def in_time(*_: object, page_number: int = number) -> None:
            # called before every operator of the page and of each form it draws
            if time.monotonic() > deadline:
                raise _TooSlowError(f"page {page_number} of {count:,}")

        try:
            in_time()
            page = reader.pages[index]
            text = (page.extract_text(visitor_operand_before=in_time) or "").strip()
        except _PDF_ERRORS as err:
            raise _broken(name, err, page=number) from err
        if not text:
            scan = _scan_of(page, f"{name}, page {number}", number)
            if scan is not None and len(scans) < max_page_images:
                scans.append(scan)
            else:
                over_limit = over_limit or scan is not None
                empty.append(number)
            continue
        texts.append(f"--- page {number} ---\n{text}" if count > 1 else text)
        chars += len(texts[-1])
        if chars > max_chars:  # already far more than fits: the rest need not be read
            return Document(name, PDF, "\n\n".join(texts), size, count, number, (), False)
    if not texts and not scans:
        raise BadInputError(
            f"{name} has no text on any of its {count:,} page{'s' if count != 1 else ''}, "
            + (
                "and its scans are over the engine's image limit per message."
                if over_limit
                else "and no scanned image to send instead (drawing pages as images needs a "
                "PDF renderer, which is not installed)."
            ),
            hint="Attach the pages as images, or a PDF with a text layer (OCR). Nothing was sent.",
        )
    return Document(
        name,
        PDF,
        "\n\n".join(texts),
        size,
        count,
        count,
        tuple(empty),
        image_pages=tuple(s.page for s in scans),
        over_image_limit=over_limit,
        page_images=tuple(scans),
    )


def _scan_of(page: PageObject, name: str, number: int) -> PageImage | None:
    """A page without text that is a scan: its largest image, as the PDF holds it (JPEG for
    most scanners). Only images within the chat's pixel cap are decoded (the size comes from
    the image's dictionary first); a page drawn with vector graphics has none and gives None."""
    try:
        resources = page.get("/Resources")
        xobjects = resources.get_object().get("/XObject") if resources is not None else None
        if xobjects is None:
            return None
        sizes = []
        for key, ref in xobjects.get_object().items():
            obj = ref.get_object()
            if obj.get("/Subtype") == "/Image":
                pixels = int(obj.get("/Width", 0)) * int(obj.get("/Height", 0))
                if 0 < pixels <= chat.MAX_IMAGE_PIXELS:
                    sizes.append((pixels, str(key)))
        if not sizes:
            return None
        image = page.images[max(sizes)[1]]
        return PageImage(number, name, bytes(image.data)) if image.data else None
    except _PDF_ERRORS:
        return None  # an image pypdf cannot decode: the page is skipped like a drawn one


def _broken(name: str, err: BaseException, page: int | None = None) -> BadInputError:
    where = f" (page {page})" if page else ""
    detail = str(err) or type(err).__name__
    return BadInputError(
        f"{name} is not a readable PDF{where}: the file is damaged or incomplete ({detail}).",
        hint="Open it in a PDF viewer and save or export it again, then attach it. "
        "Nothing was sent.",
    )


def _read_text(path: Path, name: str, size: int, max_chars: int) -> Document:
    if size > MAX_TEXT_BYTES:  # never opened: refused from its size (DocumentTooLongError)
        return Document(name, TEXT, "", size, complete=False)
    try:
        with path.open("rb") as handle:
            raw = handle.read(MAX_TEXT_BYTES + 1)  # never more, even if it grew meanwhile
    except OSError as err:
        raise BadInputError(
            f"{name} could not be read ({err.strerror}).", hint="Attach it again."
        ) from err
    if len(raw) > MAX_TEXT_BYTES:
        return Document(name, TEXT, "", len(raw), complete=False)
    text = decode_text(raw, name)
    if len(text) > max_chars:
        return Document(name, TEXT, "", size, complete=False)
    return Document(name, TEXT, text, size)


def decode_text(raw: bytes, name: str) -> str:
    """The file's text: UTF-8 (or UTF-16/32 with a byte-order mark); binary data is refused."""
    encoding = next((enc for bom, enc in _BOMS if raw.startswith(bom)), "utf-8")
    if encoding == "utf-8" and b"\x00" in raw:
        offset = raw.index(b"\x00")
        raise BadInputError(
            f"{name} is not a text file: it holds binary data (a zero byte at offset {offset:,}).",
            hint="Attach text, Markdown, code, CSV or PDF files. Nothing was sent.",
        )
    try:
        text = raw.decode(encoding)
    except UnicodeDecodeError as err:
        raise BadInputError(
            f"{name} is not UTF-8 text (an invalid byte at offset {err.start:,}); it may be "
            "binary or in another encoding.",
            hint="Save it as UTF-8 and attach it again. Nothing was sent.",
        ) from err
    return text.replace("\r\n", "\n").replace("\r", "\n")


# -------------------------------------------------------------------------------- counting


def too_long(document: Document, left: int, limit: int, taken: int, reply_room: int) -> str:
    """Why `document` does not fit, with the numbers."""
    where = (
        f"the model's context has {max(0, left):,} tokens left for it ({limit:,} in all; "
        f"about {taken:,} taken by the conversation and your message, {reply_room:,} kept for "
        "the answer)"
    )
    if document.complete:
        return f"{document.name} is {document.token_text()}, but {where}."
    if document.kind == PDF:
        return (
            f"{document.name} has {document.pages:,} pages and its first {document.pages_read:,} "
            f"are already about {document.tokens:,} tokens (estimate), but {where}."
        )
    return (
        f"{document.name} is {fmt_bytes(document.size)}, about {document.tokens:,} tokens "
        f"(estimated from its size), but {where}."
    )


def counted(document: Document, tokens: int, *, exact: bool) -> Document:
    return replace(document, tokens=tokens, exact=exact)
