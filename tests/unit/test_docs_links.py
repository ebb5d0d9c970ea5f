"""Every relative link and image in README.md and docs/*.md points to a file that exists, and every
``#anchor`` to a heading of its target, slugged as GitHub does (lowercase, punctuation other than '-' and
'_' dropped, spaces to '-', '-1', '-2', … for repeated headings)."""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

FENCE = re.compile(r"^\s{0,3}(`{3,}|~{3,})")
CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1")
HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
# [text](target "title") and ![alt](target); one level of nested brackets in the text (a badge, [x][y])
INLINE = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]*)>?(?:\s+[\"'(].*?[\"')])?\s*\)")
REFERENCE = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$")
HTML = re.compile(r"<(?:img|a|source)\b[^>]*?\b(?:src|href)\s*=\s*[\"']([^\"']+)[\"']", re.IGNORECASE)
EXTERNAL = re.compile(r"^(?:[a-z][a-z0-9+.-]*:|//)", re.IGNORECASE)


def outside_fences(text: str) -> list[tuple[int, str]]:
    """(line number, line) of the lines outside fenced code blocks."""
    out, fence = [], ""
    for number, line in enumerate(text.splitlines(), 1):
        opened = FENCE.match(line)
        if fence:
            if opened and opened.group(1)[0] == fence[0] and len(opened.group(1)) >= len(fence):
                fence = ""
            continue
        if opened:
            fence = opened.group(1)
            continue
        out.append((number, line))
    return out


def prose_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) outside fenced code blocks, with inline code spans blanked out."""
    return [(number, CODE_SPAN.sub(lambda m: " " * len(m.group(0)), line)) for number, line in outside_fences(text)]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading's text."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading keeps its text
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML tags
    return re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")


@cache
def anchors(page: Path) -> frozenset[str]:
    seen: dict[str, int] = {}
    out = set()
    for _, line in outside_fences(page.read_text(encoding="utf-8")):
        match = HEADING.match(line)
        if match:
            base = slug(match.group(2))
            count = seen.get(base, 0)
            seen[base] = count + 1
            out.add(base if count == 0 else f"{base}-{count}")
    out.update(re.findall(r"<a\s+(?:name|id)=[\"']([^\"']+)[\"']", page.read_text(encoding="utf-8")))
    return frozenset(out)


def links(page: Path) -> list[tuple[int, str]]:
    found = []
    for number, line in prose_lines(page.read_text(encoding="utf-8")):
        for pattern in (INLINE, HTML, REFERENCE):
            found += [(number, target) for target in pattern.findall(line)]
    return found


def shown(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def broken(page: Path) -> list[str]:
    problems = []
    for number, target in links(page):
        if not target or EXTERNAL.match(target):
            continue
        path_part, _, anchor = target.partition("#")
        resolved = (page.parent / path_part).resolve() if path_part else page
        where = f"{shown(page)}:{number}: {target}"
        if not resolved.exists():
            problems.append(f"{where} (no such file)")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            problems.append(f"{where} (no heading '#{anchor}' in {shown(resolved)})")
    return problems


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_and_anchors_resolve(page: Path) -> None:
    assert not broken(page), "\n".join(broken(page))


def test_the_checker_sees_what_github_renders(tmp_path: Path) -> None:
    """Slugs as GitHub makes them; links in code are not links; a wrong file or anchor is caught."""
    assert slug("Cropped vs raw: what the detector buys") == "cropped-vs-raw-what-the-detector-buys"
    assert slug("`cars98-lite1-320`") == "cars98-lite1-320"
    assert slug("How much margin around the box?") == "how-much-margin-around-the-box"
    assert slug("Embedder: torch vs onnxruntime") == "embedder-torch-vs-onnxruntime"
    assert slug("The main job: training classes") == "the-main-job-training-classes"
    (tmp_path / "other.md").write_text("# Title\n\n## A b\n\n## A b\n\n```bash\n# not a heading\n```\n")
    page = tmp_path / "page.md"
    page.write_text(
        "[ok](other.md#a-b) [dup](other.md#a-b-1) ![img](other.md) [self](#top) [web](https://x.org/y)\n"
        "`[code](missing.md)`\n\n```\n[fenced](missing.md)\n```\n\n## Top\n"
        "[gone](missing.md) [bad anchor](other.md#not-a-heading)\n"
        '<img src="missing.png">\n'
    )
    assert anchors(tmp_path / "other.md") == {"title", "a-b", "a-b-1"}
    problems = broken(page)
    targets = [problem.split(": ", 1)[1].split(" (")[0] for problem in problems]
    assert targets == ["missing.md", "other.md#not-a-heading", "missing.png"]
