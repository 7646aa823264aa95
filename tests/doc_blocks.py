"""The code blocks of a Markdown page, for the tests that run them (README.md, docs/**/*.md).

A block may be preceded by one marker line:

- ``<!-- skip-test: tests/_scripts/NAME.py -->``: not run from the page (it needs torchrun, or
  compiles, or leaks process-wide state); the block must equal that script, which a test runs.
- ``<!-- same-weights: ID -->``: the two blocks with the same ID (a peer's code and famo's) run
  as usual, and must also end with equal ``weights``.

A ```diff block holds two programs: the lines without ``+`` (before) and the lines without ``-``
(after); both run.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BLOCK = re.compile(
    r"^(?:<!-- (?P<marker>[a-z-]+)(?:: (?P<argument>\S+))? -->\n)?"
    r"```(?P<language>python|diff)\n(?P<code>.*?)^```",
    re.DOTALL | re.MULTILINE,
)


@dataclass(frozen=True)
class Block:
    page: Path
    line: int
    language: str
    code: str
    marker: str | None
    argument: str | None

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def blocks(page: Path) -> list[Block]:
    """Every ```python and ```diff block of ``page``, in order."""
    text = page.read_text(encoding="utf-8")
    found = []
    for match in BLOCK.finditer(text):
        line = text.count("\n", 0, match.start("code"))  # the line of the opening fence
        found.append(
            Block(
                page,
                line,
                match.group("language"),
                match.group("code"),
                match.group("marker"),
                match.group("argument"),
            )
        )
    return found


def diff_sides(code: str) -> tuple[str, str]:
    """The program before and the program after a unified-diff-style block."""
    before, after = [], []
    for number, line in enumerate(code.splitlines(), start=1):
        sign, rest = (line[:1], line[1:]) if line else (" ", "")
        if sign not in " +-":
            raise ValueError(f"line {number} of a diff block starts with {sign!r}: {line!r}")
        if sign != "+":
            before.append(rest)
        if sign != "-":
            after.append(rest)
    return "\n".join(before) + "\n", "\n".join(after) + "\n"


def run(code: str, where: str) -> dict[str, object]:
    """Execute ``code`` as a fresh module; its namespace."""
    namespace: dict[str, object] = {"__name__": f"docs_block_{abs(hash(where))}"}
    exec(compile(code, where, "exec"), namespace)
    return namespace
