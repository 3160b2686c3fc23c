"""Every relative link in README.md, docs/*.md and bench/*.md leads somewhere: the file exists,
and a `#fragment` names a heading of the page it points at (as GitHub makes heading anchors)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md"),
                *(ROOT / "bench").glob("*.md")])
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^(```|~~~)")


def prose(text: str) -> str:
    """The text outside fenced code blocks and inline code, where links are links."""
    kept: list[str] = []
    in_fence = False
    for line in text.splitlines():
        if FENCE.match(line.lstrip()):
            in_fence = not in_fence
            continue
        if not in_fence:
            kept.append(re.sub(r"`[^`]*`", "", line))
    return "\n".join(kept)


def anchors(page: Path) -> set[str]:
    """GitHub's anchors for the headings of a page: lower case, punctuation dropped, spaces to
    hyphens, a repeated one numbered."""
    found: set[str] = set()
    in_fence = False
    for line in page.read_text().splitlines():
        if FENCE.match(line.lstrip()):
            in_fence = not in_fence
            continue
        heading = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if in_fence or not heading:
            continue
        slug = re.sub(r"[^\w\- ]", "", heading.group(1).strip().lower()).replace(" ", "-")
        candidate, n = slug, 0
        while candidate in found:
            n += 1
            candidate = f"{slug}-{n}"
        found.add(candidate)
    return found


def broken_links(page: Path, root: Path = ROOT) -> list[str]:
    """Each link of the page that leads nowhere, with what is missing."""
    broken: list[str] = []
    for target in LINK.findall(prose(page.read_text())):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        path_part, _, fragment = target.partition("#")
        dest = (page.parent / path_part).resolve() if path_part else page
        if not dest.exists():
            broken.append(f"{target}: no file {dest.relative_to(root)}")
        elif fragment and dest.suffix == ".md" and fragment not in anchors(dest):
            broken.append(f"{target}: no heading #{fragment} in {dest.relative_to(root)}")
    return broken


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_every_relative_link_resolves(page: Path) -> None:
    assert broken_links(page) == []


def test_a_broken_link_is_found(tmp_path: Path) -> None:
    """The checker itself: a missing file and a missing heading are both reported."""
    (tmp_path / "other.md").write_text("# Other page\n\n## Known limits\n")
    page = tmp_path / "page.md"
    page.write_text("# Page\n\n[ok](other.md#known-limits) [gone](missing.md) "
                    "[bad](other.md#no-such) [self](#page) `[code](nowhere.md)`\n"
                    "```\n[fenced](nowhere.md)\n```\n[web](https://example.com/x)\n")
    assert broken_links(page, tmp_path.resolve()) == [
        "missing.md: no file missing.md", "other.md#no-such: no heading #no-such in other.md"]
