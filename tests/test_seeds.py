"""cdd_ray.seeds: a metric over training seeds, its interval holding the seed spread and the sampling noise."""

import math

import numpy as np
import pytest

from cdd_ray.seeds import Z95, combine, combine_differences


def test_two_seeds_that_differ_by_more_than_their_sampling_noise_are_spread_by_it():
    """0.60 [0.58, 0.62] and 0.70 [0.68, 0.72]: S^2 = 0.005 (ddof 1) is far above the sampling variance
    (0.02 / 1.96)^2 = 1.04e-4, so SE = sqrt(0.005 / 2) = 0.05 and the interval 0.65 -+ 0.098."""
    mean, (lo, hi) = combine([0.60, 0.70], [[0.58, 0.62], [0.68, 0.72]])
    assert mean == pytest.approx(0.65)
    assert (lo, hi) == pytest.approx((0.65 - 1.959964 * 0.05, 0.65 + 1.959964 * 0.05))


def test_seeds_that_agree_by_chance_keep_the_sampling_interval():
    """Two equal values: S^2 = 0, and the mean of two runs' sampling variances (both 0.02^2 here: half-width
    1.96 * 0.02) over 2 seeds gives SE = 0.02 / sqrt(2), never an interval of width 0."""
    half = Z95 * 0.02
    mean, (lo, hi) = combine([0.5, 0.5], [[0.5 - half, 0.5 + half]] * 2)
    assert mean == 0.5 and hi - 0.5 == pytest.approx(Z95 * 0.02 / math.sqrt(2))


def test_one_seed_is_its_own_sampling_interval_and_bad_input_is_named():
    mean, ci = combine([0.3], [[0.2, 0.4]])
    assert mean == 0.3 and ci == pytest.approx([0.2, 0.4])
    with pytest.raises(ValueError, match="one interval per value"):
        combine([0.3, 0.4], [[0.2, 0.4]])


def test_the_interval_covers_the_true_mean_at_about_95_percent_when_seeds_matter():
    """Simulated runs: a seed effect (sd 0.03) and sampling noise (sd 0.01, the interval each run reports) over
    8 seeds: the combined interval covers the configuration's mean as a normal quantile on 7 degrees of freedom
    can, P(|t_7| < 1.96) = 90.9% (89-93% over 4,000 repetitions accepted; the module doc says so), where the
    sampling interval alone covers it about a third of the time."""
    rng = np.random.default_rng(0)
    covered = sampling_only = 0
    reps = 4000
    for _ in range(reps):
        values = 0.5 + rng.normal(0, 0.03, 8) + rng.normal(0, 0.01, 8)
        cis = [[v - Z95 * 0.01, v + Z95 * 0.01] for v in values]
        _, (lo, hi) = combine(list(values), cis)
        covered += lo <= 0.5 <= hi
        m, half = values.mean(), Z95 * 0.01 / math.sqrt(8)
        sampling_only += m - half <= 0.5 <= m + half
    assert 0.89 <= covered / reps <= 0.93 and sampling_only / reps < 0.5


def test_differences_combine_as_values():
    assert combine_differences([[0.1, 0.05, 0.15], [0.3, 0.25, 0.35]]) == pytest.approx(
        [0.2, *combine([0.1, 0.3], [[0.05, 0.15], [0.25, 0.35]])[1]])
