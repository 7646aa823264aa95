"""One concern per module, each small enough to read whole: no module of famo over 450 lines."""

from __future__ import annotations

from pathlib import Path

import famo

LIMIT = 450


def test_no_famo_module_is_over_450_lines() -> None:
    package = Path(famo.__file__).parent
    sizes = {
        path.name: len(path.read_text(encoding="utf-8").splitlines())
        for path in package.glob("*.py")
    }
    assert len(sizes) >= 10
    assert {name: size for name, size in sizes.items() if size > LIMIT} == {}
