"""How to cite: CITATION.cff is valid CFF 1.2.0 and matches the package and the
bibliography."""

import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _citation() -> dict:
    return yaml.safe_load((ROOT / "CITATION.cff").read_text())


def test_citation_cff_has_the_keys_cff_1_2_0_requires():
    citation = _citation()
    assert citation["cff-version"] == "1.2.0"
    for key in ("message", "title", "authors"):
        assert citation[key], key
    assert citation["authors"] == [{"name": "The eomlib authors"}]
    assert citation["license"] == "MIT"


def test_citation_cff_version_matches_pyproject():
    # tomllib is not in Python 3.10's standard library; the line is enough.
    pyproject = (ROOT / "pyproject.toml").read_text()
    version = re.search(r'^version = "([^"]+)"', pyproject, re.MULTILINE).group(1)
    assert str(_citation()["version"]) == version


def test_the_preferred_citation_is_the_paper():
    paper = _citation()["preferred-citation"]
    assert paper["type"] == "conference-paper"
    assert paper["title"].startswith("Toward Equation of Motion for Deep Neural")
    assert paper["authors"] == [{"family-names": "Miyagawa", "given-names": "Taiki"}]
    assert paper["year"] == 2022
    assert "NeurIPS 2022" in paper["conference"]["name"]
    assert "arXiv:2210.15898" in [i["value"] for i in paper["identifiers"]]


def test_the_bibliography_has_the_paper_and_this_companion():
    bib = (ROOT / "book" / "references.bib").read_text()
    keys = re.findall(r"@\w+\{([^,]+),", bib)
    assert "miyagawa2022eom" in keys and "eomlib2026" in keys
    version = _citation()["version"]
    assert f"version   = {{{version}}}" in bib


def test_the_front_page_says_how_to_cite_both():
    intro = (ROOT / "book" / "intro.md").read_text()
    section = intro.split("## How to cite", 1)[1].split("\n## ", 1)[0]
    for needle in ("@inproceedings{miyagawa2022eom", "@software{eomlib2026"):
        assert needle in section
    assert "CITATION.cff" in section and "{ref}`figures`" in section
