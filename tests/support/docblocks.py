"""Shell blocks of the README and docs/, so a test can run them as pasted.

The convention (docs/README alike): every fenced block whose info string starts with ``sh`` or
``bash`` is a runnable block. A block that cannot run here (it needs a cluster, Docker or a real
browser) is preceded by the comment ``<!-- doctest: skip REASON -->``; a block that another test
runs in its own set-up is preceded by ``<!-- doctest: NAME -->`` so that test can find it by name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

_FENCE = re.compile(r"^```(\S*)[^\n]*$")
_MARK = re.compile(r"^<!--\s*doctest:\s*(\S+)(?:\s+(.*?))?\s*-->\s*$")
SHELLS = {"sh", "bash", "shell"}


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # 1-based line of the opening fence
    name: str  # the doctest marker's name, "" when unmarked
    note: str  # the rest of the marker (a skip's reason)
    text: str

    @property
    def skipped(self) -> bool:
        return self.name == "skip"

    @property
    def id(self) -> str:
        return f"{self.path.name}:{self.line}"


def shell_blocks(path: Path) -> list[Block]:
    """Every shell block of ``path`` in order, with the doctest marker just above it, if any."""
    lines = path.read_text().splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        opening = _FENCE.match(lines[i])
        if not opening or lines[i] == "```":
            i += 1
            continue
        lang, start = opening.group(1), i
        end = start + 1
        while end < len(lines) and lines[end].strip() != "```":
            end += 1
        if lang in SHELLS:
            name, note = _marker(lines, start)
            body = "\n".join(lines[start + 1 : end]) + "\n"
            blocks.append(Block(path, start + 1, name, note, body))
        i = end + 1
    return blocks


def _marker(lines: list[str], fence: int) -> tuple[str, str]:
    j = fence - 1
    while j >= 0 and not lines[j].strip():
        j -= 1
    found = _MARK.match(lines[j].strip()) if j >= 0 else None
    return (found.group(1), found.group(2) or "") if found else ("", "")


def named_block(path: Path, name: str) -> Block:
    """The block of ``path`` marked ``<!-- doctest: NAME -->``."""
    for block in shell_blocks(path):
        if block.name == name:
            return block
    raise LookupError(f"{path}: no shell block marked 'doctest: {name}'")
