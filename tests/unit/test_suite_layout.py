"""The suite's own layout: pytest imports test modules by basename (the default "prepend" import
mode, with no __init__.py in the test folders), so two test files of one name in different
folders each pass alone and break collection together ("import file mismatch"). That failed a CI
run once; this catches it in the unit tests, in seconds."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_no_two_test_modules_share_a_basename() -> None:
    by_name: dict[str, list[str]] = defaultdict(list)
    for path in (REPO / "tests").rglob("test_*.py"):
        by_name[path.name].append(str(path.relative_to(REPO)))
    clashes = {name: paths for name, paths in by_name.items() if len(paths) > 1}
    assert len(by_name) > 50, "the test folders were not found"
    assert not clashes, f"rename one of each: {clashes}"
