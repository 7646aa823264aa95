"""The structure a maintainer relies on (``docs/design.md``, "Where to change what").

* famo's modules import each other without a cycle, counting every import: at the top, inside
  functions and under ``TYPE_CHECKING``;
* no module reaches into a ``FAMOWeighting``'s private attributes but the one that defines it
  (the class holds one :class:`famo._state.State` and delegates to it);
* ``docs/design.md``'s table of modules lists exactly famo's modules, and its table of
  guarantees names test files that exist.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import torch

import famo
from famo import FAMOWeighting

PACKAGE = Path(famo.__file__).parent
ROOT = PACKAGE.parent


def _modules() -> dict[str, ast.Module]:
    return {
        f"famo.{path.stem}" if path.stem != "__init__" else "famo": ast.parse(path.read_text())
        for path in sorted(PACKAGE.glob("*.py"))
    }


def _imports(tree: ast.Module, known: set[str]) -> set[str]:
    """Every famo module that ``tree`` imports, wherever the import statement is."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module is not None and node.level == 0:
            # `from famo import functional` imports the module famo.functional.
            submodules = {f"{node.module}.{alias.name}" for alias in node.names} & known
            found |= submodules or {node.module}
    return found & known


def test_famo_modules_import_each_other_without_a_cycle() -> None:
    trees = _modules()
    known = set(trees)
    graph = {name: _imports(tree, known) - {name} for name, tree in trees.items()}
    assert graph["famo._state"] >= {"famo._layout", "famo._checkpoint"}  # the scan sees imports
    # Submodules never import the package itself (its __init__ imports them).
    assert {name for name, edges in graph.items() if "famo" in edges} == set()
    visiting: list[str] = []
    done: set[str] = set()

    def visit(name: str) -> None:
        assert name not in visiting, " -> ".join([*visiting[visiting.index(name) :], name])
        if name in done:
            return
        visiting.append(name)
        for other in sorted(graph[name]):
            visit(other)
        visiting.pop()
        done.add(name)

    for name in sorted(graph):
        visit(name)


def test_no_module_but_the_class_s_own_reaches_into_its_private_attributes() -> None:
    instance = FAMOWeighting(2)
    private = {
        name
        for name in {*dir(instance), *vars(instance)}
        if name.startswith("_") and not name.startswith("__")
    } - set(dir(torch.Tensor))  # (`tensor._version` is a tensor's, whatever nn.Module has)
    assert {"_state", "_buffers"} <= private
    reaching = []
    for name, tree in _modules().items():
        if name == "famo._weighting":
            continue
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and node.attr in private
                and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))
            ):
                reaching.append(f"{name}:{node.lineno} .{node.attr}")
    assert reaching == []


def test_the_table_of_guarantees_names_tests_that_exist() -> None:
    design = (ROOT / "docs" / "design.md").read_text()
    table = design[design.index("## Guarantees and the tests that pin them") :]
    named = set(re.findall(r"`(tests/[\w/]+\.py)`", table))
    assert len(named) >= 15
    assert {path for path in named if not (ROOT / path).is_file()} == set()


def test_the_map_of_modules_lists_exactly_famo_s_modules() -> None:
    design = (ROOT / "docs" / "design.md").read_text()
    table = design[design.index("## 2. Where each piece lives") : design.index("## 3.")]
    listed = set(re.findall(r"`famo/(\w+\.py)`", table))
    listed |= {f"{name}.py" for name in re.findall(r"`(\w+)\.py`", table)}
    assert listed == {path.name for path in PACKAGE.glob("*.py")}
