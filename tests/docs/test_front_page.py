"""The README leads and the docs stay honest: short, links that resolve, no lab notes."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
# The user docs; docs/results is bench/results (figures with their runs' machine notes).
USER_DOCS = [README, *sorted(p for p in (ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def test_readme_is_a_front_page():
    assert len(README.read_text().splitlines()) < 250


def test_readme_test_command_is_what_ci_runs():
    """The README's test command is the script .ci/run calls."""
    assert "bash scripts/test" in README.read_text()
    assert re.search(r"^bash scripts/test\b", (ROOT / ".ci/run").read_text(), re.M)


@pytest.mark.parametrize("page", USER_DOCS, ids=lambda p: p.name)
def test_relative_links_resolve(page: Path):
    for target in LINK.findall(page.read_text()):
        if re.match(r"[a-z]+:", target):
            continue  # http(s), mailto
        assert (page.parent / target).exists(), f"{page.name}: broken link {target}"


@pytest.mark.parametrize("page", USER_DOCS, ids=lambda p: p.name)
def test_user_docs_cite_no_issues_or_load(page: Path):
    text = page.read_text()
    assert not re.search(r"\bissues? #?\d+", text, re.I), page.name
    assert "load average" not in text.lower(), page.name


def test_every_docs_page_is_in_the_nav():
    nav = (ROOT / "mkdocs.yml").read_text()
    for page in (ROOT / "docs").glob("*.md"):
        assert f": {page.name}" in nav, f"{page.name} is missing from mkdocs.yml's nav"
