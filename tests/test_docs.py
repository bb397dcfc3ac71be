"""README and docs/ point only at files the repository has: relative links and backticked repository paths."""
from __future__ import annotations

import re
from pathlib import Path

from conftest import ROOT

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "tests").glob("README.md"))]
TOP = ("vision_attn/", "tests/", "conf/", "data/", "docs/", ".ci/")
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")
PATH = re.compile(r"`([A-Za-z0-9_.\-/]+\.(?:py|md|yaml|png|json|cpp|txt|lock))[`:]")


def referenced(page: Path) -> list[tuple[str, Path]]:
    """(as written, resolved path) for each relative link and each backticked repository path on ``page``."""
    text = page.read_text()
    refs = [(m, page.parent / m) for m in LINK.findall(text) if not re.match(r"[a-z]+:", m)]
    refs += [(m, ROOT / m) for m in PATH.findall(text) if m.startswith(TOP) or "/" not in m and m in _top()]
    return refs


def _top() -> set[str]:
    return {p.name for p in ROOT.iterdir()}


EXAMPLES = {"conf/data/mydata.yaml"}  # files the docs tell users to create


def test_the_checker_sees_links_and_paths(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("See [semantics](docs/attention.md#x), [gone](gone.md), `vision_attn/gone.py` and `tests/`.\n")
    refs = dict(referenced(page))
    assert set(refs) == {"docs/attention.md", "gone.md", "vision_attn/gone.py"}
    assert not refs["gone.md"].exists() and not refs["vision_attn/gone.py"].exists()
    assert dict(referenced(ROOT / "README.md"))["docs/attention.md"].exists()


def test_docs_reference_only_files_the_repository_has():
    missing = [(p.relative_to(ROOT).as_posix(), ref) for p in PAGES for ref, path in referenced(p)
               if not path.exists() and ref not in EXAMPLES]
    assert missing == []
