"""The README is a page a newcomer reads in minutes, and every page it maps is one click away with no broken
link: relative links in the README, CONTRIBUTING, BENCHMARKS and docs/ point at files that exist and at
headings those files have (GitHub's anchors)."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", ROOT / "BENCHMARKS.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation but '-' and '_' dropped, spaces as '-'."""
    heads = [line.lstrip("#").strip() for line in page.read_text().splitlines() if re.match(r"#{1,6} ", line)]
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in heads}


def test_readme_fits_a_screenful_of_reading_and_maps_every_page():
    readme = (ROOT / "README.md").read_text()
    assert len(readme) < 12_000, len(readme)
    linked = {m for m in LINK.findall(readme)}
    for page in PAGES[1:]:
        assert str(page.relative_to(ROOT)) in linked, f"{page.name} is not linked from the README"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page):
    broken = []
    for target in LINK.findall(page.read_text()):
        if re.match(r"[a-z]+://", target):
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(target)
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(target)
    assert not broken, f"{page.name}: {broken}"


def test_anchors_follow_githubs_rule():
    page = ROOT / "docs" / "TRAINING.md"
    assert "what-a-run-writes---out-dir" in anchors(page) and "ray-train" in anchors(page)
