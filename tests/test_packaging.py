"""The package a user installs: build the sdist and the wheel, install the wheel into a fresh
virtual environment, run the getting-started page's first example there, and type-check code
that uses famo.

One virtual environment for the whole module (torch comes pinned by constraints.txt, so pip takes
it from the local wheel cache rather than downloading a CUDA build). Nothing runs with the
repository on the path: the commands run from a temporary folder, with PYTHONPATH unset.
"""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 600  # seconds for one command (installing torch from the wheel cache takes ~1 minute)


@dataclass
class Installed:
    sdist: Path
    wheel: Path
    python: Path  # the fresh environment's interpreter
    workdir: Path  # outside the repository


def _run(
    command: list[str | Path], cwd: Path, check: bool = True
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    result = subprocess.run(
        [str(c) for c in command],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    if check and result.returncode != 0:
        pytest.fail(f"{command} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def _first_python_block(page: Path) -> str:
    """The first ```python block of a documentation page."""
    match = re.search(r"```python\n(.*?)```", page.read_text(encoding="utf-8"), re.DOTALL)
    assert match is not None, f"no python block in {page}"
    return match.group(1)


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    root = tmp_path_factory.mktemp("packaging")
    # Build from a copy of the tree, so that the build leaves nothing in the repository (and
    # the wheel is built from the sdist, which checks that the sdist is complete).
    # The files a clone would have (tracked, or new and not ignored), as they are now.
    source = root / "source"
    listed = _run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT)
    for name in listed.stdout.splitlines():
        if (ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    dist = root / "dist"
    _run([sys.executable, "-m", "build", "--no-isolation", "--outdir", dist, source], cwd=root)
    (sdist,) = dist.glob("famo-*.tar.gz")
    (wheel,) = dist.glob("famo-*.whl")
    venv = root / "venv"
    _run([sys.executable, "-m", "venv", venv], cwd=root)
    python = venv / "bin" / "python"
    constraints = ROOT / "constraints.txt"
    _run([python, "-m", "pip", "install", "-q", "-c", constraints, wheel], cwd=root)
    workdir = root / "work"
    workdir.mkdir()
    return Installed(sdist, wheel, python, workdir)


def _version() -> str:
    text = (ROOT / "famo" / "_version.py").read_text(encoding="utf-8")
    match = re.search(r'^__version__ = "([^"]+)"$', text, re.MULTILINE)
    assert match is not None
    return match.group(1)


def test_the_version_has_one_source() -> None:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert "version" not in pyproject["project"]
    assert "version" in pyproject["project"]["dynamic"]
    dynamic = pyproject["tool"]["setuptools"]["dynamic"]["version"]
    assert dynamic == {"attr": "famo._version.__version__"}
    changelog = (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
    assert re.search(rf"^## .*\b{re.escape(_version())}\b", changelog, re.MULTILINE), changelog


def test_the_wheel_and_sdist_hold_what_users_need(installed: Installed) -> None:
    version = _version()
    assert installed.wheel.name == f"famo-{version}-py3-none-any.whl"
    with zipfile.ZipFile(installed.wheel) as wheel:
        names = set(wheel.namelist())
        metadata = wheel.read(f"famo-{version}.dist-info/METADATA").decode()
    assert {"famo/py.typed", "famo/_version.py", "famo/__init__.py"} <= names
    assert not any(name.startswith(("tests/", "benchmarks/")) for name in names)
    assert f"\nVersion: {version}\n" in metadata
    assert "Description-Content-Type: text/markdown" in metadata
    # The long description renders off the repository: every link and image is absolute.
    description = metadata.split("\n\n", 1)[1]
    assert "FAMO" in description
    targets = re.findall(r"\]\(([^)]*)\)", description) + re.findall(r"<(\S+://\S+)>", description)
    assert targets, "expected the paper's link at least"
    assert all(t.startswith("https://") for t in targets), targets
    with tarfile.open(installed.sdist) as sdist:
        top = f"famo-{version}/"
        members = {m.removeprefix(top) for m in sdist.getnames() if m.startswith(top)}
    assert {"famo/py.typed", "pyproject.toml", "LICENSE", "README.md", "CHANGELOG.md"} <= members


def test_the_getting_started_example_runs_from_the_installed_wheel(installed: Installed) -> None:
    where = _run(
        [installed.python, "-c", "import famo, famo._version; print(famo.__file__)"],
        cwd=installed.workdir,
    ).stdout.strip()
    assert Path(where).is_relative_to(installed.python.parent.parent), where
    assert not Path(where).is_relative_to(ROOT), where
    versions = _run(
        [
            installed.python,
            "-c",
            "import famo, importlib.metadata as m; print(famo.__version__, m.version('famo'))",
        ],
        cwd=installed.workdir,
    ).stdout.split()
    assert versions == [_version(), _version()]
    script = installed.workdir / "example.py"
    script.write_text(_first_python_block(ROOT / "docs" / "getting-started.md"), encoding="utf-8")
    result = _run([installed.python, script], cwd=installed.workdir)
    weights = ast.literal_eval(
        result.stdout.strip().splitlines()[-1]
    )  # the example prints the weights
    assert set(weights) == {"famo/seg", "famo/depth", "famo/normal"}
    assert abs(sum(weights.values()) - 1.0) < 1e-5
    assert (installed.workdir / "checkpoint.pt").exists()


def test_the_long_description_example_runs(installed: Installed) -> None:
    """The example on the package index page, as the installed metadata holds it."""
    script = installed.workdir / "description_example.py"
    code = (
        "import importlib.metadata, re\n"
        "text = importlib.metadata.metadata('famo').get_payload()\n"
        "blocks = re.findall(r'```python\\n(.*?)```', text, re.DOTALL)\n"
        "assert len(blocks) == 1, blocks\n"
        "exec(blocks[0])\n"
        "print(float(famo.weights.sum()))\n"
    )
    script.write_text(code, encoding="utf-8")
    result = _run([installed.python, script], cwd=installed.workdir)
    assert abs(float(result.stdout.split()[-1]) - 1.0) < 1e-5


def test_users_type_checker_sees_famos_types(installed: Installed) -> None:
    """mypy --strict on user code finds famo's annotations through py.typed: correct code passes,
    and a wrong argument is an error (without py.typed both files fail with import-untyped)."""
    good = installed.workdir / "uses_famo.py"
    good.write_text(
        "import torch\n"
        "from famo import FAMOWeighting\n\n"
        'famo = FAMOWeighting(["seg", "depth"])\n'
        'losses = {"seg": torch.tensor(1.0), "depth": torch.tensor(2.0)}\n'
        "objective: torch.Tensor = famo.loss(losses)\n"
        "weights: torch.Tensor = famo.weights\n",
        encoding="utf-8",
    )
    bad = installed.workdir / "misuses_famo.py"
    bad.write_text(
        'from famo import FAMOWeighting\n\nFAMOWeighting(["seg", "depth"]).loss("seg")\n',
        encoding="utf-8",
    )
    result = _run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--strict",
            "--no-incremental",
            "--python-executable",
            installed.python,
            good.name,
            bad.name,
        ],
        cwd=installed.workdir,
        check=False,
    )
    errors = [line for line in result.stdout.splitlines() if ": error:" in line]
    assert errors, result.stdout + result.stderr
    assert all(line.startswith(f"{bad.name}:3:") for line in errors), result.stdout
    assert "[arg-type]" in errors[0]
