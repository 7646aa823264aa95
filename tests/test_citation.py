"""CITATION.cff: valid Citation File Format 1.2.0, for the paper and this software, in step with
the version and the changelog."""

from __future__ import annotations

import datetime
import re
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
PAPER_AUTHORS = [("Liu", "Bo"), ("Feng", "Yihao"), ("Stone", "Peter"), ("Liu", "Qiang")]
# The CFF 1.2.0 schema, as far as this file uses it: the keys each object may have.
TOP_KEYS = {
    "cff-version", "message", "type", "title", "abstract", "authors", "version", "date-released",
    "license", "keywords", "references", "preferred-citation", "repository-code", "url", "doi",
    "identifiers", "commit", "contact", "license-url", "repository", "repository-artifact",
}  # fmt: skip
REFERENCE_KEYS = {
    "type", "title", "authors", "collection-title", "conference", "volume", "year", "url",
    "identifiers", "doi", "pages", "publisher", "month", "notes", "abstract", "version",
}  # fmt: skip
REFERENCE_TYPES = {"conference-paper", "article", "software", "generic", "report", "thesis"}
PERSON_KEYS = {"family-names", "given-names", "name", "orcid", "affiliation", "email", "website"}


def load() -> dict[str, Any]:
    data = yaml.safe_load((ROOT / "CITATION.cff").read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def check_authors(authors: Any, where: str) -> None:
    assert isinstance(authors, list) and authors, f"{where}: authors is a non-empty list"
    for person in authors:
        assert isinstance(person, dict) and set(person) <= PERSON_KEYS, (where, person)
        assert "name" in person or "family-names" in person, (where, person)
        assert all(isinstance(value, str) and value for value in person.values()), person


def check_reference(reference: Any, where: str) -> None:
    assert isinstance(reference, dict) and set(reference) <= REFERENCE_KEYS, (where, reference)
    assert reference["type"] in REFERENCE_TYPES, where
    assert isinstance(reference["title"], str) and reference["title"], where
    check_authors(reference["authors"], where)
    for identifier in reference.get("identifiers", []):
        assert identifier["type"] in {"doi", "url", "swh", "other"}, identifier
        assert isinstance(identifier["value"], str), identifier


def test_the_citation_file_is_valid_cff() -> None:
    data = load()
    assert set(data) <= TOP_KEYS, set(data) - TOP_KEYS
    assert data["cff-version"] == "1.2.0"
    assert data["type"] == "software"
    for key in ("message", "title", "license"):
        assert isinstance(data[key], str) and data[key], key
    check_authors(data["authors"], "software")
    assert isinstance(data["version"], str)
    datetime.date.fromisoformat(data["date-released"])
    assert all(isinstance(word, str) for word in data["keywords"])
    for reference in data["references"]:
        check_reference(reference, "references")
    check_reference(data["preferred-citation"], "preferred-citation")


def test_it_cites_the_paper() -> None:
    paper = load()["preferred-citation"]
    assert paper["type"] == "conference-paper"
    assert paper["title"] == "FAMO: Fast Adaptive Multitask Optimization"
    assert [(a["family-names"], a["given-names"]) for a in paper["authors"]] == PAPER_AUTHORS
    assert (paper["year"], paper["volume"], paper["conference"]["name"]) == (
        2023,
        36,
        "NeurIPS 2023",
    )
    assert "2306.03792" in paper["url"]


def test_it_is_the_released_version() -> None:
    """The version and date of the software entry are those of famo and of its changelog."""
    data = load()
    version = re.search(
        r'__version__ = "([^"]+)"', (ROOT / "famo" / "_version.py").read_text(encoding="utf-8")
    )
    assert version is not None and data["version"] == version.group(1)
    changelog = (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
    release = re.search(rf"^## \[{re.escape(data['version'])}\] - (\S+)$", changelog, re.MULTILINE)
    assert release is not None, f"CHANGELOG.md has no heading for {data['version']}"
    assert data["date-released"] == release.group(1)
    assert data["license"] == "MIT" and "MIT" in (ROOT / "LICENSE").read_text(encoding="utf-8")
