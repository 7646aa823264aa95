"""The documentation site: built offline like ``make docs`` (a warning fails the build), then
opened page by page in a real browser (headless Chromium, driven by Selenium).

The browser test needs Debian's ``chromium`` and ``chromium-driver`` (``.ci/run`` installs them);
where they are absent, that one test is skipped with a message. Its screenshots go to
``$FAMO_DOCS_SCREENSHOTS`` (default ``docs/_build/screenshots``), and their paths are printed.
"""

from __future__ import annotations

import functools
import html.parser
import http.server
import importlib
import inspect
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PUBLIC_MODULES = ["famo", "famo.functional", "famo.amp", "famo.lightning", "famo.transformers"]
BUILD_TIMEOUT_S = 600


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``sphinx -W --keep-going -b html docs`` into a fresh folder, as ``make docs`` runs it."""
    out = tmp_path_factory.mktemp("docs")
    command = [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html"]
    command += ["-d", str(out / "doctrees"), str(DOCS), str(out / "html")]
    result = subprocess.run(
        command, cwd=ROOT, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S, check=False
    )
    assert result.returncode == 0, f"the docs build failed:\n{result.stdout}\n{result.stderr}"
    return out / "html"


class _Page(html.parser.HTMLParser):
    """The ids, links and loaded resources of one HTML page."""

    def __init__(self) -> None:
        super().__init__()
        self.ids: set[str] = set()
        self.links: list[str] = []
        self.resources: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = {name: value or "" for name, value in attrs}
        if "id" in values:
            self.ids.add(values["id"])
        if tag == "a" and "href" in values:
            self.links.append(values["href"])
        if tag in ("script", "img", "iframe") and "src" in values:
            self.resources.append(values["src"])
        if tag == "link" and "href" in values:
            self.resources.append(values["href"])


@functools.cache
def parse(path: Path) -> _Page:
    page = _Page()
    page.feed(path.read_text(encoding="utf-8"))
    return page


def pages(site: Path) -> list[Path]:
    return sorted(site.rglob("*.html"))


def test_the_site_has_every_page(site: Path) -> None:
    for name in [
        "index",
        "getting-started",
        "algorithm",
        "hyperparameters",
        "when-famo-helps",
        "howto",
        "migration",
        "errors",
        "guarantees",
        "api",
        "benchmarks",
        "design",
        "changelog",
        *(
            f"recipes/{recipe}"
            for recipe in [
                "plain-loop",
                "amp",
                "accumulation",
                "distributed",
                "compile",
                "lightning",
                "transformers",
                "accelerate",
                "peft",
                "deepspeed",
                "fsdp2",
                "ray",
            ]
        ),
    ]:
        assert (site / f"{name}.html").is_file(), name


def test_nothing_is_loaded_from_the_network(site: Path) -> None:
    """Scripts, styles and images are files of the site; math uses the MathJax copy in it."""
    for path in pages(site):
        for resource in parse(path).resources:
            assert not urllib.parse.urlparse(resource).scheme, f"{path.name} loads {resource}"
        text = path.read_text(encoding="utf-8")
        for host in ("cdn.", "jsdelivr", "unpkg", "cdnjs", "googleapis"):
            assert host not in text, f"{path.name} names {host}"
    algorithm = parse(site / "algorithm.html").resources
    mathjax = [r for r in algorithm if "mathjax" in r]
    assert mathjax, "the algorithm page loads no MathJax"
    assert (site / urllib.parse.urlparse(mathjax[0]).path).is_file()


def test_the_api_reference_covers_every_public_name(site: Path) -> None:
    ids = parse(site / "api.html").ids
    for module_name in PUBLIC_MODULES:
        module = importlib.import_module(module_name)
        assert f"module-{module_name}" in ids or module_name == "famo", module_name
        for name in module.__all__:
            if inspect.ismodule(getattr(module, name)):  # documented on its own
                assert f"module-{module_name}.{name}" in ids, f"{module_name}.{name}"
            else:
                assert f"{module_name}.{name}" in ids, f"{module_name}.{name} is not documented"
    import torch

    import famo

    mro = famo.FAMOWeighting.__mro__
    own = {n for cls in mro[: mro.index(torch.nn.Module)] for n in vars(cls)}
    for name in sorted(n for n in own - {"forward", "extra_repr"} if not n.startswith("_")):
        assert f"famo.FAMOWeighting.{name}" in ids, f"FAMOWeighting.{name} is not documented"


def test_the_constructor_documents_every_option(site: Path) -> None:
    """The ``:param`` list is generated from the options' records; it must reach the page."""
    from famo._settings import OPTIONS

    text = re.sub(r"<[^>]+>", "", (site / "api.html").read_text(encoding="utf-8"))
    section = text.split("Create the object", 1)[1].split("Parameters", 1)[1][:20000]
    for option in OPTIONS:
        assert f"{option.name} –" in section, f"{option.name} is missing from the constructor"


def _text(path: Path) -> str:
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", path.read_text(encoding="utf-8")))


# What the option descriptor's own docstring says; each option's attribute must show its record.
DESCRIPTOR_INTERNALS = [
    "Assigning calls the owner",
    "An option as an attribute",
    "_setting_changed",
]


def documentation_pages(site: Path) -> list[Path]:
    """The pages written for readers: not the highlighted source files under ``_modules/``."""
    return [path for path in pages(site) if "_modules" not in path.relative_to(site).parts]


def test_no_page_shows_the_option_descriptors_internals(site: Path) -> None:
    for path in documentation_pages(site):
        text = _text(path)
        for internal in DESCRIPTOR_INTERNALS:
            assert internal not in text, f"{path.relative_to(site)} shows {internal!r}"


# Pages whose subject is how famo itself is checked cite the tests; the others do not.
HOW_IT_IS_CHECKED = {"design.html", "guarantees.html"}


def test_user_pages_show_no_test_plumbing(site: Path) -> None:
    for path in documentation_pages(site):
        name = path.relative_to(site).as_posix()
        if name in HOW_IT_IS_CHECKED:
            continue
        text = _text(path)
        for plumbing in ("tests/", "_scripts", "This block is"):
            assert plumbing not in text, f"{name} shows {plumbing!r}"


def test_code_blocks_have_a_copy_button_and_the_index_is_linked(site: Path) -> None:
    """sphinx-copybutton's script is a file of the site, loaded by every documentation page."""
    for path in documentation_pages(site):
        resources = parse(path).resources
        script = [r for r in resources if urllib.parse.urlparse(r).path.endswith("copybutton.js")]
        assert script, f"{path.relative_to(site)} loads no copy button"
        target = (path.parent / urllib.parse.urlparse(script[0]).path).resolve()
        assert target.is_file(), script[0]
    assert (site / "genindex.html").is_file()
    assert "genindex.html" in parse(site / "index.html").links


def test_internal_links_resolve(site: Path) -> None:
    """Every link inside the site names a file of it and, with a fragment, an id on that page."""
    for path in pages(site):
        for link in parse(path).links:
            parts = urllib.parse.urlparse(link)
            if parts.scheme or link.startswith("mailto:"):
                continue
            target = (
                (path.parent / urllib.parse.unquote(parts.path)).resolve() if parts.path else path
            )
            if target.is_dir():
                target = target / "index.html"
            assert target.is_file(), f"{path.relative_to(site)} links to missing {link}"
            if parts.fragment and target.suffix == ".html":
                fragment = urllib.parse.unquote(parts.fragment)
                assert fragment in parse(target).ids, f"{path.relative_to(site)}: {link}"


# ----------------------------------------------------------------------------- the real browser

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


@pytest.fixture(scope="module")
def served(site: Path) -> Iterator[str]:
    """The site over HTTP on the loopback address, as a reader's browser would see it."""
    handler = functools.partial(_QuietHandler, directory=str(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    if CHROMIUM is None or CHROMEDRIVER is None:
        pytest.skip(
            "headless Chromium is not installed, so the docs were not opened in a browser: "
            "apt-get install chromium chromium-driver (.ci/run does)"
        )
    webdriver = pytest.importorskip("selenium.webdriver")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    profile = tmp_path_factory.mktemp("chromium-profile")
    for argument in [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={profile}",
        "--window-size=1280,1600",
        # Any host but the loopback one fails to resolve: a page that reaches out shows it.
        "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
    ]:
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    os.environ.setdefault("SE_OFFLINE", "true")  # never let Selenium Manager download a driver
    service = webdriver.ChromeService(executable_path=CHROMEDRIVER)
    driver = webdriver.Chrome(options=options, service=service)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def _wait(condition: Any, timeout_s: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.1)


def _requests(driver: Any) -> list[str]:
    import json

    urls = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            urls.append(message["params"]["request"]["url"])
    return urls


# A code block or table of the text column whose content is wider than what shows of it.
_CUT_OFF = """
const cut = [];
for (const element of document.querySelectorAll('article pre, article table')) {
  const box = element.closest('.table-wrapper') || element;
  if (element.scrollWidth > element.clientWidth + 1 || box.scrollWidth > box.clientWidth + 1) {
    cut.push(element.tagName + ' ' + element.scrollWidth + ' px in ' + box.clientWidth + ' px: '
             + element.innerText.slice(0, 50));
  }
}
return cut;
"""

# The colour of an added and of a removed line of a diff, and of an unchanged one.
_DIFF_COLOURS = """
const block = document.querySelector('div.highlight-diff pre');
const colour = (selector) => getComputedStyle(block.querySelector(selector) || block).color;
return [colour('.gi'), colour('.gd'), getComputedStyle(block).color];
"""


def test_the_site_in_a_real_browser(site: Path, served: str, browser: Any) -> None:
    """Every page loads with no console error and no request off the site; math is typeset; no
    code block or table is cut off at 1280 px; code blocks have copy buttons; a diff's added and
    removed lines have colours of their own in the light and the dark theme; screenshots of the
    front page and a recipe are saved; search finds pages."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    failures: list[str] = []
    typeset_pages = 0
    copy_buttons = 0
    for path in pages(site):
        name = path.relative_to(site).as_posix()
        browser.get(served + name)
        _wait(lambda: browser.execute_script("return document.readyState") == "complete")
        if browser.find_elements(By.CSS_SELECTOR, ".math"):
            typeset = _wait(
                lambda: browser.execute_script(
                    "return document.querySelectorAll('mjx-container').length"
                )
            )
            if typeset:
                typeset_pages += 1
            else:
                failures.append(f"{name}: math left as TeX (no MathJax output)")
            if browser.find_elements(By.CSS_SELECTOR, "mjx-merror"):
                failures.append(f"{name}: MathJax could not typeset some TeX")
        if not name.startswith("_modules/"):  # highlighted source files scroll, like any code
            for cut in browser.execute_script(_CUT_OFF):
                failures.append(f"{name}: cut off at 1280 px: {cut}")
            copy_buttons += browser.execute_script(
                "return document.querySelectorAll('button.copybtn').length"
            )
        for entry in browser.get_log("browser"):
            if entry["level"] == "SEVERE":
                failures.append(f"{name}: console error: {entry['message']}")
        for url in _requests(browser):
            if url.startswith(("http:", "https:", "ws:", "wss:")) and not url.startswith(served):
                failures.append(f"{name}: requested {url}")
        for href in browser.execute_script(
            "return Array.from(document.querySelectorAll('a[href]'), a => a.href)"
        ):
            if href.startswith(served):
                local = urllib.parse.unquote(urllib.parse.urlparse(href).path)
                target = site / local.lstrip("/")
                if target.is_dir():
                    target = target / "index.html"
                if not target.is_file():
                    failures.append(f"{name}: broken link {href}")
    assert not failures, "\n".join(failures)
    assert typeset_pages >= 3, f"MathJax typeset only {typeset_pages} pages"
    assert copy_buttons >= 40, f"only {copy_buttons} copy buttons on the user pages"

    folder = Path(os.environ.get("FAMO_DOCS_SCREENSHOTS", DOCS / "_build" / "screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    for page, file in [("index.html", "front-page.png"), ("recipes/amp.html", "recipe-amp.png")]:
        browser.get(served + page)
        _wait(lambda: browser.execute_script("return document.readyState") == "complete")
        _wait(lambda: browser.execute_script("return document.fonts.status") == "loaded")
        browser.save_screenshot(str(folder / file))
        assert (folder / file).stat().st_size > 10_000
        print(f"screenshot: {folder / file}")

    # The front page's diff in both themes: + and - lines differ from each other and from text.
    for theme in ("light", "dark"):
        browser.get(served + "index.html")
        _wait(lambda: browser.execute_script("return document.readyState") == "complete")
        browser.execute_script(f"document.body.dataset.theme = '{theme}'")
        added, removed, plain = browser.execute_script(_DIFF_COLOURS)
        assert len({added, removed, plain}) == 3, (theme, added, removed, plain)

    # Search, as a reader uses it: type in the sidebar's box, press Enter, read the results.
    browser.get(served + "index.html")
    box = browser.find_element(By.CSS_SELECTOR, "input[name='q']")
    box.send_keys("attach", Keys.ENTER)
    _wait(lambda: "search.html" in browser.current_url)
    results = _wait(
        lambda: browser.find_elements(By.CSS_SELECTOR, "#search-results ul.search li a")
    )
    assert results, "searching for 'attach' found nothing"
    titles = {result.text for result in results}
    assert any("Getting started" in title for title in titles), titles
