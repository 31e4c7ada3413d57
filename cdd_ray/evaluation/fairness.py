"""Fairness of generated samples: class shares, distances to uniform, and their uncertainty.

- ``tv_to_uniform``: total variation between the generated class shares and uniform.
- ``fd``: the fairness discrepancy of the fair-generation literature (Choi et al. 2020, TIW-DSM 2024): the
  L2 distance between the generated class shares (hard labels of the labeller) and the uniform target.
- ``tv_floor``: the expected ``tv_to_uniform`` of an *exactly* uniform generator with the same number of
  samples: a measured tv near it is as fair as N samples can show.
- Intervals: 95% percentile bootstrap over the generated samples. Resampling N labels with replacement
  is a multinomial draw with the measured shares, so it costs nothing next to sampling.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import binom

LEVEL = 0.95


def class_shares(labels: np.ndarray, n_classes: int) -> list[float]:
    counts = np.bincount(np.asarray(labels), minlength=n_classes).astype(float)
    return (counts / counts.sum()).tolist()


def tv_to_uniform(shares) -> float:
    s = np.asarray(shares, float)
    return 0.5 * float(np.abs(s - 1.0 / s.shape[-1]).sum(-1))


def fd_to_uniform(shares) -> float:
    s = np.asarray(shares, float)
    return float(np.sqrt(((s - 1.0 / s.shape[-1]) ** 2).sum(-1)))


def minority_share(shares, minority_positions: list[int]) -> float | None:
    """Mean share of the minority classes (None without minority classes)."""
    return float(np.mean([shares[i] for i in minority_positions])) if minority_positions else None


def tv_between(p, q) -> float:
    """Total variation between two distributions given as (unnormalised) shares over the same classes."""
    a, b = np.asarray(p, float), np.asarray(q, float)
    if a.sum() == 0 or b.sum() == 0:
        return 1.0
    return 0.5 * float(np.abs(a / a.sum() - b / b.sum()).sum())


def tv_floor(n: int, k: int) -> float:
    """E[tv_to_uniform] for n samples of an exactly uniform generator over k classes (exact).

    Each class count is Binomial(n, 1/k), so E tv = k/2 * E|X/n - 1/k| summed over the binomial's support.
    """
    x = np.arange(n + 1)
    return float(0.5 * k * (binom.pmf(x, n, 1.0 / k) * np.abs(x / n - 1.0 / k)).sum())


def percentile_interval(values: np.ndarray, level: float = LEVEL) -> list[float]:
    """[lo, hi] of bootstrap ``values`` along axis 0 (lists for vector statistics)."""
    a = (1 - level) / 2
    lo, hi = np.quantile(values, [a, 1 - a], axis=0)
    return [lo.tolist(), hi.tolist()] if np.ndim(lo) == 0 else [[float(u), float(v)] for u, v in zip(lo, hi)]


def share_intervals(labels: np.ndarray, n_classes: int, minority_positions: list[int], resamples: int,
                    seed: int) -> dict:
    """95% bootstrap intervals of every class share, the minority share, tv_to_uniform and fd."""
    counts = np.bincount(np.asarray(labels), minlength=n_classes)
    n = int(counts.sum())
    boot = np.random.default_rng(seed).multinomial(n, counts / n, size=resamples) / n
    out = {
        "class_shares_ci": percentile_interval(boot),
        "tv_to_uniform_ci": percentile_interval(0.5 * np.abs(boot - 1.0 / n_classes).sum(1)),
        "fd_ci": percentile_interval(np.sqrt(((boot - 1.0 / n_classes) ** 2).sum(1))),
    }
    if minority_positions:
        out["minority_share_ci"] = percentile_interval(boot[:, minority_positions].mean(1))
    return out


def fairness_metrics(labels: np.ndarray, n_classes: int, minority_positions: list[int], resamples: int,
                     seed: int) -> dict:
    """Shares, minority share, tv_to_uniform, fd, tv_floor and (``resamples`` > 0) their intervals."""
    shares = class_shares(labels, n_classes)
    out = {
        "class_shares": shares,
        "minority_share": minority_share(shares, minority_positions),
        "tv_to_uniform": tv_to_uniform(shares),
        "fd": fd_to_uniform(shares),
        "tv_floor": tv_floor(len(labels), n_classes),
    }
    if resamples:
        out.update(share_intervals(labels, n_classes, minority_positions, resamples, seed))
    return out
