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
PROGRAM = re.compile(r"(python|pytest|pip|mlflow|ray)\b")


def code_lines(page: Path) -> list[str]:
    """The lines of a page's indented code blocks, continued lines (``\\``) joined."""
    lines, out = page.read_text().splitlines(), []
    for line in lines:
        if not line.startswith("    "):
            continue
        if out and out[-1].endswith("\\"):
            out[-1] = out[-1][:-1].rstrip() + " " + line.strip()
        else:
            out.append(line.strip())
    return out


def commands(page: Path) -> list[str]:
    """The commands a page shows: its code blocks' lines (and, for the README, its inline code) that start with a
    program a user runs, without comments, leading environment assignments, or ``&&`` chains; a ``ray job
    submit ... -- CMD`` gives both commands."""
    found = code_lines(page)
    if page.name == "README.md":
        found += re.findall(r"`([^`]+)`", page.read_text())
    out = []
    for c in found:
        for part in c.split("&&"):
            part = re.sub(r"^(\w+=\S+\s+)+", "", part.split("  #")[0].strip())
            if PROGRAM.match(part):
                out += [x.strip() for x in part.split(" -- ")]
    return out


def test_the_command_finder_reads_the_pages_as_a_user_copies_them():
    readme, cluster = commands(ROOT / "README.md"), commands(ROOT / "docs" / "CLUSTER.md")
    assert "python jobs/tune_mnist.py" in readme and "python -m cdd_ray.register --sweep NAME --pick quality" in readme
    assert "python jobs/tune_mnist.py --storage s3://my-bucket/cdd-ray --name sweep-1 --resume" in cluster
    submit = [c for c in cluster if c.startswith("ray job submit")]
    assert submit and "--runtime-env-json" in submit[0] and "python jobs/tune_mnist.py --storage s3://my-bucket/cdd-ray" in cluster


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_command_a_page_shows_is_run_by_a_test_as_typed(page):
    """Each program a page runs (a job, a module with -m, ``mlflow ui|server``, ``ray start|job submit``) is started
    by a test in a subprocess, with the flags the page gives it (smoke-sized values where the page's are long): an
    importing test missed that `python -m cdd_ray.register` failed for users. pip and the README's pytest:
    `.ci/run` runs exactly them; CONTRIBUTING's pytest lines run the suite's own tests."""
    tests = {p: p.read_text() for p in (ROOT / "tests").rglob("*.py")}
    ci = (ROOT / ".ci" / "run").read_text()
    for command in commands(page):
        words = command.split()
        if words[0] in ("pip", "pytest"):
            assert command in ci or page.name != "README.md" or command == "pip install -e .", command
            continue
        if words[0] == "python" and words[1] == "-m":
            program = [f'"-m", "{words[2]}"']
        elif words[0] == "python":
            program = [f'"{Path(words[1]).name}"']
        else:  # mlflow ui|server, ray start|job submit
            program = [f'"{w}"' for w in words[:3 if words[1] == "job" else 2]]
        runs = [p for p, src in tests.items() if all(s in src for s in program) and "subprocess" in src]
        assert runs, f"{page.name}: no test starts {command!r}"
        flags = [w for w in words if w.startswith("--") and w not in NEEDS_A_GPU]
        assert any(all(f'"{f}"' in tests[p] for f in flags) for p in runs), (command, flags, [p.name for p in runs])


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_test_a_page_names_exists(page):
    """A page that says which test checks a claim (``tests/x.py::test_y``, or ``::test_z`` after one) names a test
    that is there: tests move and get renamed."""
    defined = {str(p.relative_to(ROOT)): set(re.findall(r"^def (test_\w+)", p.read_text(), re.M))
               for p in (ROOT / "tests").rglob("*.py")}
    text, missing = page.read_text(), []
    for path, test in re.findall(r"(tests/[\w/]+\.py)(?:::(test_\w+))?", text):
        if path not in defined or (test and test not in defined[path]):
            missing.append(f"{path}::{test}" if test else path)
    everywhere = set().union(*defined.values())
    missing += [t for t in re.findall(r"`::(test_\w+)`", text) if t not in everywhere]
    assert not missing, f"{page.name}: {missing}"
