"""Sphinx configuration of the famo documentation site (``make docs``).

Pages are MyST Markdown; the API reference is autodoc on the live objects (some docstrings are
built at import time). Math is typeset by the MathJax 3 copy that the ``sphinx-mathjax-offline``
wheel ships, so neither the build nor a reader's browser fetches anything.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(ROOT))

import famo  # noqa: E402  (after the path is set, so the checkout is documented, not a wheel)
from benchmarks.facts import facts  # noqa: E402

project = "famo"
author = "the famo authors"
copyright = "2026, the famo authors"
release = version = famo.__version__

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",  # the docstrings' "Example:" and "References:" sections
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "sphinx_copybutton",  # a copy button on every code block; the files ship in its wheel
]
source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "_generated"]  # _generated/ is included by pages, not a page

# MyST: $...$ and $$...$$ math, ::: fences, anchors for headings down to ###, and {{ name }}
# for the measured numbers (benchmarks/facts.py reads them from benchmarks/results/*.json).
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "deflist", "substitution"]
myst_heading_anchors = 3
myst_substitutions = facts()

autodoc_member_order = "bysource"
autoclass_content = "both"  # the constructor's :param list is generated on __init__
autodoc_typehints = "signature"
napoleon_google_docstring = True
napoleon_numpy_docstring = False

# MathJax from the sphinx-mathjax-offline wheel, copied into _static/mathjax.
_mathjax = importlib.util.find_spec("sphinx-mathjax-offline")
if _mathjax is None or not _mathjax.submodule_search_locations:
    raise RuntimeError(
        "sphinx-mathjax-offline is missing: pip install -c constraints.txt '.[docs]'"
    )
html_static_path = [
    "_static",
    str(Path(next(iter(_mathjax.submodule_search_locations))) / "static"),
]
mathjax_path = "mathjax/tex-chtml.js"

html_theme = "furo"
html_title = f"famo {release}"
html_favicon = "_static/favicon.svg"  # a page that names its icon: no request for /favicon.ico
# famo.css: a diff's added and removed lines coloured in both themes; wide tables scroll in
# their own box instead of being cut off at the page's edge.
html_css_files = ["famo.css"]
html_theme_options = {"navigation_with_keys": True}
html_last_updated_fmt = None
html_copy_source = False
html_show_sourcelink = False

# The copy button leaves out a shell prompt and Python's ">>> " and "... " (docstring examples).
copybutton_prompt_text = r">>> |\.\.\. |\$ "
copybutton_prompt_is_regexp = True
copybutton_only_copy_prompt_lines = False


def _benchmark_results() -> None:
    """docs/_generated/benchmark_results.md: the report of `python -m benchmarks.report`.

    The report links its figures from the repository root (it is spliced into the README);
    here they are one folder up, and its sections sit one level higher on the page.
    """
    report = (ROOT / "benchmarks" / "results" / "README_results.md").read_text(encoding="utf-8")
    report = report.replace("](benchmarks/results/", "](../benchmarks/results/")
    report = re.sub(r"^### ", "## ", report, flags=re.MULTILINE)
    target = DOCS / "_generated" / "benchmark_results.md"
    target.parent.mkdir(exist_ok=True)
    if not target.exists() or target.read_text(encoding="utf-8") != report:
        target.write_text(report, encoding="utf-8")


_benchmark_results()
