"""One metric measured over several training seeds: the mean, with a 95% interval that holds both noises.

A run's interval covers its evaluation's sampling noise only; a second training seed (same config, new data order,
noise and timesteps) moves the metric by more. With ``n`` runs of one configuration, each giving a value ``v_k``
and a 95% sampling interval ``[lo_k, hi_k]``:

- the value is the mean over the seeds, ``m = mean(v_k)``;
- each run's sampling variance is read from its interval, ``s_k^2 = ((hi_k - lo_k) / (2 * 1.96))^2``;
- the variance of one run is estimated by the seeds' sample variance ``S^2`` (ddof 1), which holds the seed-to-seed
  spread *and* the sampling noise; with few seeds ``S^2`` can come out small by chance, so it is never taken below
  the runs' mean sampling variance ``mean(s_k^2)`` (what the runs would vary by with no seed effect at all);
- ``m``'s standard error is ``sqrt(max(S^2, mean(s_k^2)) / n)`` and its interval ``m -+ 1.96 * SE``.

The runs must be replicates: each seed's evaluation samples its own noise (``optim.train_seed`` moves it), so its
sampling error is independent of the other seeds'; they share the images, the labeller and the reference set (the
instrument), so the interval is conditional on those. One seed is its own interval, unchanged.

The normal quantile is a choice: with 2 seeds ``S^2`` rests on one difference (a t quantile with one degree of
freedom would be 12.7, an interval of no use), so the interval is a guide that can be too narrow when the seed
effect is large and the seeds few; more seeds (``--confirm-seeds``) make it firm. A difference between two points
is combined the same way from its per-seed paired differences (seed k of the point against seed k of the reference,
sampled from the same noise).
"""

from __future__ import annotations

import math
from typing import Sequence

Z95 = 1.959964


def sampling_variance(ci: Sequence[float] | None) -> float:
    """The variance a 95% interval ``[lo, hi]`` stands for (a normal's); 0 without one."""
    return ((float(ci[1]) - float(ci[0])) / (2 * Z95)) ** 2 if ci else 0.0


def combine(values: Sequence[float], cis: Sequence[Sequence[float] | None]) -> tuple[float, list[float]]:
    """(mean over the seeds, its 95% interval [lo, hi]) from each seed's value and sampling interval (module doc)."""
    n = len(values)
    if n == 0 or len(cis) != n:
        raise ValueError(f"combine: {n} values and {len(cis)} intervals; need one interval per value, at least one")
    if n == 1:  # one seed: its own interval, as measured (a bootstrap's may be asymmetric)
        return float(values[0]), [float(cis[0][0]), float(cis[0][1])] if cis[0] else [float(values[0])] * 2
    mean = sum(values) / n
    spread = sum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else 0.0
    sampling = sum(sampling_variance(ci) for ci in cis) / n
    half = Z95 * math.sqrt(max(spread, sampling) / n)
    return mean, [mean - half, mean + half]


def combine_differences(diffs: Sequence[Sequence[float]]) -> list[float]:
    """[d, lo, hi] over the seeds from each seed's paired difference [d_k, lo_k, hi_k]."""
    mean, ci = combine([d[0] for d in diffs], [d[1:] for d in diffs])
    return [mean, *ci]
