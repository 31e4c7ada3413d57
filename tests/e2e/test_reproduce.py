"""jobs/reproduce_paper.py at --scale smoke: the paper's pair under one MLflow parent run, reproduction.md filled."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from cdd_ray import tracking
from cdd_ray.reproduce import PAPER_FID

ROOT = Path(__file__).resolve().parents[2]


def reproduce(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    return subprocess.run([sys.executable, str(ROOT / "jobs" / "reproduce_paper.py"), "--scale", "smoke", "--local",
                           *args], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=900)


def table(text: str, heading: str) -> list[list[str]]:
    """The cells of the first markdown table after ``heading`` (header and separator left out)."""
    rows = []
    for line in text[text.index(heading):].splitlines()[1:]:
        if line.startswith("|"):
            rows.append([c.strip() for c in line.strip("|").split("|")])
        elif rows:
            break
    return rows[2:]


def children(tmp_path: Path, parent_id: str) -> dict[str, object]:
    client = tracking.client(f"sqlite:///{tmp_path / 'mlflow.db'}")
    parent = client.get_run(parent_id)
    runs = client.search_runs([parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'")
    return parent, {r.data.tags["role"]: r for r in runs}, client


@pytest.mark.parametrize("task", ["mnist", "finetune"])
def test_smoke_reproduction_writes_every_column(tmp_path, task):
    out = tmp_path / "rep"
    p = reproduce(tmp_path, "--task", task, "--out", str(out))
    assert p.returncode == 0, p.stderr[-3000:]
    text = (out / "reproduction.md").read_text()
    assert "## FID" in p.stdout and str(out / "reproduction.md") in p.stdout
    paper_u, paper_c = PAPER_FID[task]
    fid = table(text, "## FID")
    roles = ("unconstrained", "constrained")
    summaries = {r: json.loads((out / r / "summary.json").read_text()) for r in roles}
    for row, role, paper in zip(fid, roles, (paper_u, paper_c)):
        # the paper's number beside the run's own measurement and interval
        assert row[:2] == [role, f"{paper:.1f}"]
        s = summaries[role]
        assert row[2] == f"{s['fid']:.2f} [{s['fid_ci'][0]:.2f}, {s['fid_ci'][1]:.2f}]"
    assert fid[2][1] == f"{paper_c - paper_u:+.1f} ({(paper_c - paper_u) / paper_u:+.0%})"
    assert "classifier, 32 samples a model" in text and "**not comparable** with the paper's numbers" in text
    shares = table(text, "## Class shares")
    assert len(shares) == 10 and all(row and all(c and c != "-" for c in row) for row in shares), shares
    if task == "mnist":
        c = summaries["constrained"]
        # predicted with the unconstrained run's measured shares as q, and both errors stated
        assert c["predicted_shares_from_baseline"] is not None
        assert [float(r[5]) for r in shares] == pytest.approx(c["predicted_shares_from_baseline"], abs=5e-4)
        assert (f"{c['prediction_error']:.3f} with the data mix, {c['prediction_error_baseline']:.3f} with the "
                "unconstrained model's shares") in text
        assert all(c and c != "-" for row in table(text, "## Fairness") for c in row)
    else:
        assert shares[9][1] == "- (new class)"  # the pre-trained model never saw 9s
        assert all(c != "-" for row in table(text, "| model | new share") for c in row)
    assert (out / "lambda.png").is_file() and "![lambda](lambda.png)" in text
    assert re.search(r"final lambda: \w+ \d+\.\d{4}", text)
    # one MLflow parent run: the reproduction page and plot, its runs as children at the same budget
    parent_id = re.search(r"parent run ([0-9a-f]{32})", text).group(1)
    parent, kids, client = children(tmp_path, parent_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["role"] == "reproduction"
    assert {a.path for a in client.list_artifacts(parent_id)} >= {"reproduction.md", "lambda.png"}
    want = {"unconstrained", "constrained"} | ({"pretrained"} if task == "finetune" else set())
    assert set(kids) == want and all(k.info.status == "FINISHED" for k in kids.values())
    assert kids["unconstrained"].data.params["optim.steps"] == kids["constrained"].data.params["optim.steps"]
    assert parent.data.metrics["constrained/fid"] == pytest.approx(summaries["constrained"]["fid"])
    if task == "mnist":
        assert json.loads(kids["constrained"].data.params["eval.baseline_shares"]) == pytest.approx(
            summaries["unconstrained"]["class_shares"])
        # the same --out again: refused before any work, the reproduction kept
        again = reproduce(tmp_path, "--task", task, "--out", str(out))
        assert again.returncode == 2 and "already holds a reproduction" in again.stderr
        assert (out / "reproduction.md").read_text() == text


@pytest.mark.parametrize("task, classes", [("celeba", 2), ("imagenet", 5)])
def test_the_data_tasks_reproduce_from_their_folders(tmp_path, task, classes, celeba_root, imagefolder_root,
                                                     tiny_vae):
    """docs/REPRODUCTION.md's Celeb-A and ImageNet commands (``--root``, ``--vae``) on the stand-in datasets: the
    compared runs train at the same budget under one parent run (ImageNet, the paper's protocol: both continue the
    unconstrained run), the page has the task's classes and both FIDs."""
    out = tmp_path / "rep"
    data = ["--root", str(celeba_root)] if task == "celeba" else ["--root", str(imagefolder_root), "--vae",
                                                                   str(tiny_vae)]
    p = reproduce(tmp_path, "--task", task, *data, "--out", str(out))
    assert p.returncode == 0, p.stderr[-3000:]
    text = (out / "reproduction.md").read_text()
    compared = {"unconstrained": "unconstrained" if task == "celeba" else "unconstrained-continued",
                "constrained": "constrained"}
    fid = table(text, "## FID")
    for row, (label, role) in zip(fid, compared.items()):
        s = json.loads((out / role / "summary.json").read_text())
        assert row[:2] == [label, f"{PAPER_FID[task][label == 'constrained']:.1f}"]
        assert row[2] == f"{s['fid']:.2f} [{s['fid_ci'][0]:.2f}, {s['fid_ci'][1]:.2f}]"
        assert len(s["class_shares"]) == classes
    assert len(table(text, "## Class shares")) == classes
    parent, kids, _ = children(tmp_path, re.search(r"parent run ([0-9a-f]{32})", text).group(1))
    assert parent.info.status == "FINISHED" and set(kids) == {"unconstrained", *compared.values()}
    u, c = (kids[compared[k]].data for k in ("unconstrained", "constrained"))
    assert u.params["optim.steps"] == c.params["optim.steps"]
    assert u.params.get("optim.init_from") == c.params.get("optim.init_from")  # the same start


def test_bad_input_is_named_before_any_run(tmp_path, monkeypatch):
    from cdd_ray.config import ConfigError
    from cdd_ray.reproduce import reproduce as library_reproduce

    p = reproduce(tmp_path, "--task", "mnist", "--resume")
    assert p.returncode == 2 and "--resume: a reproduction starts anew" in p.stderr
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")

    def train(*a, **k):
        raise AssertionError("no run may start")

    for task, scale, overrides, message in (
            ("cifar", "smoke", {}, "--task: 'cifar' not allowed; allowed: mnist, finetune, celeba, imagenet"),
            ("mnist", "huge", {}, "--scale: 'huge' not allowed; allowed: paper, cpu, smoke"),
            ("mnist", "smoke", {"dual.optimizer": "adam"}, "dual.optimizer: 'adam' not allowed")):
        with pytest.raises(ConfigError, match=re.escape(message)):
            library_reproduce(task, scale, tmp_path / "x", overrides, "bad", train)
        assert not (tmp_path / "x").exists()
