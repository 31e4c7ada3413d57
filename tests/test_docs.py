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


NEEDS_A_GPU = {"--gpu"}  # asks the cluster for GPUs: not on the CPU machines the suite runs on


def readme_commands() -> list[str]:
    """The commands the README shows: lines of its indented code blocks and inline code that start with a program
    a user runs (``&&`` chains split)."""
    text = (ROOT / "README.md").read_text()
    found = [line.strip() for line in text.splitlines() if line.startswith("    ")]
    found += re.findall(r"`([^`]+)`", text)
    commands = []
    for c in found:
        for part in c.split("&&"):
            part = part.split("  #")[0].strip()
            if re.match(r"(python|pytest|pip|mlflow)\b", part):
                commands.append(part)
    return commands


def test_every_readme_command_is_run_by_a_test_as_typed():
    """Each program the README runs (a job, a module with -m, mlflow ui, pytest) is started by a test in a
    subprocess, with the flags the README gives it: an importing test missed that `python -m cdd_ray.register`
    failed for users. (pip and pytest: `.ci/run` runs exactly them.)"""
    tests = {p: p.read_text() for p in (ROOT / "tests").rglob("*.py")}
    ci = (ROOT / ".ci" / "run").read_text()
    commands = readme_commands()
    assert "python jobs/tune_mnist.py" in commands and "python -m cdd_ray.register --sweep NAME --pick quality" in commands
    for command in commands:
        words = command.split()
        if words[0] in ("pip", "pytest"):
            assert command in ci or command == 'pip install -e .', command  # `.ci/run`: pip install -e ".[test]" && pytest
            continue
        if words[0] == "python" and words[1] == "-m":
            program = [f'"-m", "{words[2]}"']
        elif words[0] == "python":
            program = [f'"{Path(words[1]).name}"']
        else:  # mlflow ui
            program = [f'"{words[1]}"']
        runs = [p for p, src in tests.items() if all(s in src for s in program) and "subprocess" in src]
        assert runs, f"no test starts {command!r}"
        flags = [w for w in words if w.startswith("--") and w not in NEEDS_A_GPU]
        assert any(all(f'"{f}"' in tests[p] for f in flags) for p in runs), (command, flags, [p.name for p in runs])
