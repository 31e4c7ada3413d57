"""PNG artifacts: sample grids, class histograms, multiplier trajectories."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402


def save_grid(images: np.ndarray, path: str | Path, n: int = 100, scale: int = 2) -> Path:
    """The first ``n`` uint8 images (N x S x S grey or N x S x S x 3 RGB) tiled into a square grid PNG."""
    images = images[:n]
    cols = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    s = images.shape[1]
    grid = np.zeros((rows * (s + 1) + 1, cols * (s + 1) + 1, *images.shape[3:]), dtype=np.uint8)
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        grid[1 + r * (s + 1):1 + r * (s + 1) + s, 1 + c * (s + 1):1 + c * (s + 1) + s] = im
    img = Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST)
    img.save(path)
    return Path(path)


def save_histogram(class_ids: Sequence[int], measured: Sequence[float], path: str | Path,
                   predicted: Sequence[float] | None = None, objective: Sequence[float] | None = None,
                   title: str = "", others: dict[str, Sequence[float]] | None = None,
                   measured_ci: Sequence[Sequence[float]] | None = None) -> Path:
    """Measured class shares of generated samples (with their 95% intervals as error bars) vs the mixture
    prediction, data priors and uniform."""
    k = len(class_ids)
    x = np.arange(k)
    pairs = (("predicted", predicted), ("training data", objective), *(others or {}).items())
    bars = [("measured", measured)] + [(n, v) for n, v in pairs if v]
    w = 0.8 / len(bars)
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for i, (label, vals) in enumerate(bars):
        err = None
        if label == "measured" and measured_ci:
            err = [[v - lo for v, (lo, _) in zip(vals, measured_ci)], [hi - v for v, (_, hi) in zip(vals, measured_ci)]]
        ax.bar(x + (i - (len(bars) - 1) / 2) * w, vals, w, label=label, yerr=err, capsize=2 if err else 0)
    ax.axhline(1.0 / k, color="k", ls="--", lw=1, label="uniform (target)")
    ax.set_xticks(x, [str(c) for c in class_ids])
    ax.set_xlabel("class")
    ax.set_ylabel("share")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def save_lambda_plot(names: Sequence[str], lam_history: Sequence[Sequence[float]], path: str | Path) -> Path:
    fig, ax = plt.subplots(figsize=(6, 3.5))
    arr = np.asarray(lam_history, dtype=float).reshape(len(lam_history), len(names))
    for i, n in enumerate(names):
        ax.plot(np.arange(1, len(arr) + 1), arr[:, i], label=n)
    ax.set_xlabel("dual step")
    ax.set_ylabel("lambda")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)
