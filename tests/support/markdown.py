"""The code blocks of README.md and docs/*.md, for the tests that run them (tests/docs/test_docs.py).

A block is run unless the line before its fence is ``<!-- not run: why -->``. In a ``console``
block the commands are the lines after ``$ ``; the other lines are sample output.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
RUNNABLE = ("python", "sh", "console")
LANGUAGES = (*RUNNABLE, "yaml", "text")

_FENCE = re.compile(r"^```(\S*)\s*$")
_NOT_RUN = re.compile(r"^<!-- not run: (.+) -->$")


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # of the opening fence, 1-based
    lang: str
    text: str
    not_run: str | None  # the reason given, when the block is marked

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"

    def script(self) -> str:
        """What to execute: the block, or a console block's commands."""
        if self.lang == "console":
            return "".join(line[2:] + "\n" for line in self.text.splitlines() if line.startswith("$ "))
        return self.text


def blocks(path: Path) -> list[Block]:
    lines = path.read_text().splitlines()
    found, before, i = [], "", 0
    while i < len(lines):
        fence = _FENCE.match(lines[i])
        if fence is None:
            before = lines[i].strip() or before
            i += 1
            continue
        start, body = i, []
        i += 1
        while i < len(lines) and lines[i] != "```":
            body.append(lines[i])
            i += 1
        marker = _NOT_RUN.match(before)
        found.append(
            Block(
                path, start + 1, fence.group(1), "\n".join(body) + "\n", marker.group(1) if marker else None
            )
        )
        before, i = "", i + 1
    return found


def all_blocks() -> list[Block]:
    return [block for path in DOC_FILES for block in blocks(path)]


def runnable() -> list[Block]:
    return [b for b in all_blocks() if b.lang in RUNNABLE and b.not_run is None]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    inside, out = False, set()
    for line in path.read_text().splitlines():
        if _FENCE.match(line):
            inside = not inside
        elif not inside and line.startswith("#"):
            out.add(slug(line.lstrip("#")))
    return out
