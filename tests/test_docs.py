"""The documents: a front door of at most 200 lines, and links that lead somewhere."""

from __future__ import annotations

import re

import pytest

from conftest import ROOT

DOCUMENTS = [ROOT / "README.md", ROOT / "bench" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)#\s]+)(#[^)\s]*)?\)")


def test_the_readme_is_a_front_door():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 200


def broken_links(document) -> list[str]:
    """Relative links of a Markdown file whose file, or heading, is not there."""
    broken = []
    for target, anchor in LINK.findall(document.read_text()):
        if target.startswith(("http://", "https://")):
            continue
        path = (document.parent / target).resolve()
        if not path.exists():
            broken.append(target)
        elif anchor and path.suffix == ".md":
            slugs = {re.sub(r"[^\w\- ]", "", h).strip().lower().replace(" ", "-")
                     for h in re.findall(r"^#+ (.*)$", path.read_text(), re.M)}
            if anchor[1:] not in slugs:
                broken.append(target + anchor)
    return broken


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_lead_to_files_and_headings(document):
    assert not broken_links(document)


def test_the_link_check_sees_a_broken_link(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("[gone](nowhere.md) [here](page.md#title) [not here](page.md#other)\n# Title\n")
    assert broken_links(page) == ["nowhere.md", "page.md#other"]
