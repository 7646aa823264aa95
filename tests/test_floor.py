"""The oldest torch famo supports: declared once, installed and tested by ``make test-floor``.

``pyproject.toml`` declares ``torch>=FLOOR``; ``constraints-floor.txt`` pins ``torch==FLOOR`` for
the environment of its own (``.venv-floor``) in which ``make test-floor`` runs the core tests, and
``make test`` (what CI runs) runs it. These tests keep the declaration, the pin, the Makefile and
the pages that state the floor from drifting apart. They need only the standard library and
torch, so they run in the floor environment too.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def declared_floor() -> str:
    """The version in pyproject.toml's ``dependencies = ["torch>=FLOOR"]``."""
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    dependencies = re.search(r"^dependencies = \[(.*?)\]", pyproject, re.MULTILINE)
    assert dependencies, "pyproject.toml has no one-line dependencies list"
    (floor,) = re.findall(r'"torch>=([0-9.]+)"', dependencies.group(1))
    return floor


def pinned_floor() -> str:
    """The version the floor environment installs (``torch==`` in constraints-floor.txt)."""
    text = (ROOT / "constraints-floor.txt").read_text(encoding="utf-8")
    (pin,) = re.findall(r"^torch==([0-9.]+)$", text, re.MULTILINE)
    return pin


def release(version: str) -> tuple[int, ...]:
    """(2, 8, 0) from "2.8", "2.8.0" or "2.8.0+cpu"."""
    parts = [int(part) for part in re.match(r"[0-9.]+", version).group(0).strip(".").split(".")]  # type: ignore[union-attr]
    return tuple(parts + [0] * (3 - len(parts)))


def test_the_declared_floor_is_the_version_the_floor_environment_installs() -> None:
    assert release(declared_floor()) == release(pinned_floor())
    assert declared_floor().count(".") == 2, "declare the exact release that CI installs"


def test_make_test_runs_the_core_tests_on_the_floor() -> None:
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    test_rule = makefile.split("\ntest:", 1)[1].split("\n\n", 1)[0]
    assert "$(MAKE) --no-print-directory test-floor" in test_rule
    floor_rule = makefile.split("\ntest-floor:", 1)[1].split("\n\n", 1)[0]
    assert "FAMO_FLOOR_ENV=1" in floor_rule and "-m pytest" in floor_rule
    assert "constraints-floor.txt" in makefile


def test_this_torch_is_the_floor_or_newer() -> None:
    """In the floor environment exactly the declared floor runs; elsewhere nothing older."""
    running, floor = release(torch.__version__), release(declared_floor())
    if os.environ.get("FAMO_FLOOR_ENV") == "1":
        assert running == floor, (torch.__version__, declared_floor())
    else:
        assert running >= floor, (torch.__version__, declared_floor())


def test_the_pages_state_the_declared_floor() -> None:
    floor = ".".join(declared_floor().split(".")[:2])
    for name in ["README.md", "PYPI.md", "docs/index.md", "docs/getting-started.md"]:
        text = (ROOT / name).read_text(encoding="utf-8")
        stated = set(re.findall(r"torch ?(?:>=|≥) ?([0-9][0-9.]*[0-9])", text))
        assert f"torch>={floor}" in text, f"{name} does not say torch>={floor}"
        assert all(release(v) >= release(floor) for v in stated), (name, stated)
