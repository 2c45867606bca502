"""docs/architecture.md matches the tree.

- Every module under appliance/ and ui/ (but `__init__.py` and `__main__.py`) is named in the page
  by its path from the repository root, in backticks: `appliance/engine/board.py`. A new module
  without a line in the module map fails here.
- Every backticked path in the page that looks like a file of this repository (ends in .py, .md,
  .toml or .sh, or is a folder ending in /) exists. A module renamed or removed without the page
  following fails here.

Fenced code blocks (the diagram) are left out; absolute paths, URLs and placeholders (`<data>`)
are not repository paths.
"""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "architecture.md"
PACKAGES = ("appliance", "ui")
SKIPPED = {"__init__.py", "__main__.py"}
FILE_SUFFIXES = (".py", ".md", ".toml", ".sh")
_FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)
_SPAN = re.compile(r"`([^`\n]+)`")
_PATHLIKE = re.compile(r"[A-Za-z0-9_.][A-Za-z0-9_./-]*")


def backticked(text: str) -> set[str]:
    """Every inline code span of a markdown text, fenced blocks left out."""
    return set(_SPAN.findall(_FENCE.sub("", text)))


def repo_paths(spans: set[str]) -> set[str]:
    """The spans that name a file or folder of the repository (relative, no URL, no `<...>`)."""
    return {
        span
        for span in spans
        if _PATHLIKE.fullmatch(span) and (span.endswith(FILE_SUFFIXES) or span.endswith("/"))
    }


def modules(root: Path = REPO) -> list[str]:
    """Every product module's path from the repository root."""
    found = [
        path.relative_to(root).as_posix()
        for package in PACKAGES
        for path in (root / package).rglob("*.py")
        if path.name not in SKIPPED and "__pycache__" not in path.parts
    ]
    return sorted(found)


def unnamed_modules(text: str, root: Path = REPO) -> list[str]:
    spans = backticked(text)
    return [module for module in modules(root) if module not in spans]


def missing_paths(text: str, root: Path = REPO) -> list[str]:
    return sorted(path for path in repo_paths(backticked(text)) if not (root / path).exists())


def test_the_scanner_reads_spans_and_paths() -> None:
    text = (
        "The `appliance/engine/board.py` board, `ui/` and `docs/x.md`;\n"
        "```\n`appliance/in_a_fence.py`\n```\n"
        "not paths: `/run/step-station-socket`, `<data>/control/control.sock`, "
        "`http://127.0.0.1:8000/v1`, `Supervisor.start`, `a b.py`\n"
    )
    assert backticked(text) >= {"appliance/engine/board.py", "ui/", "docs/x.md"}
    assert "appliance/in_a_fence.py" not in backticked(text)
    assert repo_paths(backticked(text)) == {"appliance/engine/board.py", "ui/", "docs/x.md"}


def test_a_planted_module_and_path_are_caught(tmp_path: Path) -> None:
    """The checks fail on a module the page does not name and a path that does not exist."""
    for rel in ("appliance/engine/board.py", "appliance/__init__.py", "ui/new_tab.py"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("", encoding="utf-8")
    text = "`appliance/engine/board.py` and `appliance/engine/gone.py` in `appliance/engine/`"
    assert modules(tmp_path) == ["appliance/engine/board.py", "ui/new_tab.py"]
    assert unnamed_modules(text, tmp_path) == ["ui/new_tab.py"]
    assert missing_paths(text, tmp_path) == ["appliance/engine/gone.py"]


def test_every_module_is_named_in_the_doc() -> None:
    assert len(modules()) > 50  # the tree was found
    missing = unnamed_modules(DOC.read_text(encoding="utf-8"))
    assert missing == [], (
        f"docs/architecture.md does not name {missing}: add a line to its module map "
        "(the path from the repository root, in backticks)."
    )


def test_every_path_in_the_doc_exists() -> None:
    text = DOC.read_text(encoding="utf-8")
    assert len(repo_paths(backticked(text))) > 50  # the page's paths were found
    missing = missing_paths(text)
    assert missing == [], f"docs/architecture.md names paths that do not exist: {missing}"
