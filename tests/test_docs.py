"""The README and docs/: short entry, every page linked, no dead links, flag tables from the parser."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# [text](target) outside code: the target up to an optional #anchor.
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)|!\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.DOTALL | re.MULTILINE)


def anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    text = FENCE.sub("", page.read_text())
    titles = re.findall(r"^#+\s+(.*)$", text, re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-") for title in titles}


def links(page: Path) -> list[str]:
    text = FENCE.sub("", page.read_text())
    text = re.sub(r"`[^`\n]*`", "", text)  # inline code is not a link
    return [a or b for a, b in LINK.findall(text)]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_relative_links_resolve(page: Path) -> None:
    dead = []
    for target in links(page):
        if re.match(r"[a-z]+://|mailto:", target):
            continue
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        missing_anchor = anchor and resolved.suffix == ".md" and anchor not in anchors(resolved)
        if not resolved.exists() or missing_anchor:
            dead.append(target)
    assert not dead, f"{page.name}: dead links {dead}"


def test_readme_is_a_short_entry_linking_every_page() -> None:
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 300
    sections = re.findall(r"^## (.*)$", readme, re.MULTILINE)
    assert sections[0] == "Quickstart"
    assert "make main" in readme and "make test" in readme
    linked = {Path(t.partition("#")[0]).name for t in links(ROOT / "README.md") if t.startswith("docs/")}
    assert {p.name for p in PAGES[1:] if p.suffix == ".md"} <= linked


def test_flag_tables_match_the_parser() -> None:
    spec = importlib.util.spec_from_file_location("flag_tables", ROOT / "scripts" / "flag_tables.py")
    flag_tables = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(flag_tables)
    assert not flag_tables.stale_pages(), "run python scripts/flag_tables.py"
    service = (ROOT / "docs" / "service.md").read_text()
    for flag in ("--workers", "--http-port", "--token-file", "VAESERVE_WORKERS"):
        assert f"`{flag}`" in service  # the serve table is really there, not an empty marker


def test_the_console_page_says_uploads_keep_their_colour() -> None:
    """The browser sends a colour model three channels (pictures.js); the page must not say grey."""
    script = (ROOT / "service" / "console" / "static" / "pictures.js").read_text()
    assert 'const channels = shape.kind === "rgb" ? 3 : 1;' in script
    page = " ".join((ROOT / "docs" / "console.md").read_text().split())
    assert "in grey for a grey model and in colour for a colour one" in page
