"""Fairness of generated samples: class shares, distances to uniform, and their uncertainty.

- ``tv_to_uniform``: total variation between the generated class shares and uniform.
- ``fd``: the fairness discrepancy of the fair-generation literature (Choi et al. 2020, TIW-DSM 2024): the
  L2 distance between the generated class shares (hard labels of the labeller) and the uniform target.
- ``tv_floor``: the expected ``tv_to_uniform`` of an *exactly* uniform generator with the same number of
  samples: a measured tv near it is as fair as N samples can show. ``tv_excess`` = tv_to_uniform - tv_floor,
  the tv beyond what a perfect generator scores at this N (its interval: tv's, shifted alike). ``fd_floor``:
  the root-mean-square ``fd`` of an exactly uniform generator, sqrt((1 - 1/k) / N) (exact).
- ``samples_needed``: the N below which a fairness target cannot be told from a perfect generator (the target
  is under the floor); a target under the floor at the evaluation's N is refused before a sweep starts.
- ``prediction_error_floor``: the 95th percentile of the largest per-class error of a *perfect* prediction
  (samples drawn exactly from it), by multinomial simulation: a prediction error below it is as close as N
  samples can show.
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


def fd_floor(n: int, k: int) -> float:
    """Root-mean-square fd_to_uniform of n samples of an exactly uniform generator over k classes (exact):
    E sum_c (X_c / n - 1/k)^2 = k * (1/k)(1 - 1/k) / n."""
    return float(np.sqrt((1.0 - 1.0 / k) / n))


FLOORS = {"tv_to_uniform": tv_floor, "fd": fd_floor}


def samples_needed(metric: str, target: float, k: int) -> int:
    """The smallest number of samples at which a perfect (uniform) generator's ``metric`` floor is below
    ``target`` (both floors fall as 1/sqrt(n); bisection on n)."""
    floor = FLOORS[metric]
    lo, hi = 1, 2
    while floor(hi, k) >= target:
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if floor(mid, k) >= target else (lo, mid)
    return hi


def prediction_error_floor(predicted, n: int, baseline=None, baseline_n: int = 0,
                           lam_by_pos: dict[int, float] | None = None, draws: int = 4000, seed: int = 0,
                           level: float = LEVEL) -> float:
    """The ``level`` quantile of max_c |measured_c - predicted_c| when the prediction is exactly right and the
    measured shares are n samples of it. With ``baseline`` (a baseline's measured shares q, from ``baseline_n``
    samples) the prediction is Theorem 1's, (q + lambda) / (1 + sum lambda) with ``lam_by_pos`` (lambda per class
    position): q's own sampling noise then passes into the prediction, as it does in the real check."""
    p = np.asarray(predicted, float)
    p = p / p.sum()
    rng = np.random.default_rng(seed)
    measured = rng.multinomial(n, p, size=draws) / n
    pred = np.broadcast_to(p, measured.shape)
    if baseline is not None and baseline_n:
        q = np.asarray(baseline, float)
        lam = np.zeros(len(p))
        for i, v in (lam_by_pos or {}).items():
            lam[i] = v
        q_hat = rng.multinomial(baseline_n, q / q.sum(), size=draws) / baseline_n
        pred = (q_hat + lam) / (1 + lam.sum())
    return float(np.quantile(np.abs(measured - pred).max(1), level))


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
    """Shares, minority share, tv_to_uniform, fd, their floors, tv_excess and (``resamples`` > 0) intervals."""
    shares = class_shares(labels, n_classes)
    out = {
        "class_shares": shares,
        "minority_share": minority_share(shares, minority_positions),
        "tv_to_uniform": tv_to_uniform(shares),
        "fd": fd_to_uniform(shares),
        "tv_floor": tv_floor(len(labels), n_classes),
        "fd_floor": fd_floor(len(labels), n_classes),
    }
    out["tv_excess"] = out["tv_to_uniform"] - out["tv_floor"]
    if resamples:
        out.update(share_intervals(labels, n_classes, minority_positions, resamples, seed))
        out["tv_excess_ci"] = [v - out["tv_floor"] for v in out["tv_to_uniform_ci"]]
    return out
