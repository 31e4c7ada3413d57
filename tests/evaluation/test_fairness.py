import numpy as np
import pytest

from cdd_ray.core.dual import predicted_shares
from cdd_ray.evaluation.fairness import (class_shares, fairness_metrics, fd_floor, fd_to_uniform, minority_share,
                                         prediction_error_floor, samples_needed, share_intervals, tv_floor,
                                         tv_to_uniform)


def test_fd_is_the_l2_distance_to_uniform_shares():
    assert fd_to_uniform([0.5, 0.25, 0.0, 0.25]) == pytest.approx(np.sqrt(0.25 ** 2 + 0.25 ** 2))
    assert fd_to_uniform([0.1] * 10) == pytest.approx(0.0)
    assert fd_to_uniform([1.0, 0.0]) == pytest.approx(np.sqrt(0.5))


@pytest.mark.parametrize("n, k, expected", [
    (1, 10, 0.9),  # one sample: a one-hot share vector, tv = (k - 1) / k
    (2, 2, 0.25),  # both in one class (prob 1/2): tv 1/2; one each: 0
    (3, 3, 8 / 27),  # (3,0,0): 1/9 x 2/3; (2,1,0): 2/3 x 1/3; (1,1,1): 0
])
def test_tv_floor_by_hand(n, k, expected):
    assert tv_floor(n, k) == pytest.approx(expected)


def test_tv_floor_matches_simulated_uniform_generators():
    rng = np.random.default_rng(0)
    sims = [tv_to_uniform(class_shares(rng.integers(0, 10, 500), 10)) for _ in range(4000)]
    assert tv_floor(500, 10) == pytest.approx(np.mean(sims), abs=0.001)
    assert 0.045 < tv_floor(500, 10) < 0.06  # the "about 0.05" for N = 500


def test_a_uniform_sample_interval_contains_a_tenth_for_every_class():
    labels = np.repeat(np.arange(10), 100)
    ci = share_intervals(labels, 10, [4, 5, 7], resamples=2000, seed=0)
    half = 1.96 * np.sqrt(0.1 * 0.9 / 1000)  # normal approximation of a binomial share's interval
    for lo, hi in ci["class_shares_ci"]:
        assert lo < 0.1 < hi
        assert lo == pytest.approx(0.1 - half, abs=0.004) and hi == pytest.approx(0.1 + half, abs=0.004)
    lo, hi = ci["minority_share_ci"]
    assert lo < 0.1 < hi and hi - lo < 2 * half  # a mean of three shares is tighter than one share
    lo, hi = ci["tv_to_uniform_ci"]
    assert lo >= 0 and hi < 0.1 and lo < tv_floor(1000, 10) < hi


def test_intervals_of_a_one_class_sample_are_points():
    ci = share_intervals(np.zeros(50, dtype=int), 4, [1], resamples=100, seed=0)
    assert ci["class_shares_ci"] == [[1.0, 1.0], [0.0, 0.0], [0.0, 0.0], [0.0, 0.0]]
    assert ci["tv_to_uniform_ci"] == pytest.approx([0.75, 0.75])
    assert ci["fd_ci"] == pytest.approx([np.sqrt(0.75 ** 2 + 3 * 0.25 ** 2)] * 2)
    assert ci["minority_share_ci"] == [0.0, 0.0]


def test_fairness_metrics_reports_every_metric_with_its_interval():
    labels = np.array([0, 0, 1, 3] * 25)
    m = fairness_metrics(labels, 4, [1, 2], resamples=200, seed=1)
    assert m["class_shares"] == [0.5, 0.25, 0.0, 0.25]
    assert m["minority_share"] == pytest.approx(minority_share(m["class_shares"], [1, 2])) == pytest.approx(0.125)
    assert m["tv_to_uniform"] == pytest.approx(0.25) and m["fd"] == pytest.approx(np.sqrt(0.125))
    assert m["tv_floor"] == pytest.approx(tv_floor(100, 4))
    for key in ("tv_to_uniform", "fd", "minority_share"):
        lo, hi = m[f"{key}_ci"]
        assert lo <= m[key] <= hi and hi > lo
    assert "fd_ci" not in fairness_metrics(labels, 4, [1], resamples=0, seed=1)


def test_tv_excess_of_uniform_generators_is_zero_on_average_where_tv_is_the_floor():
    """tv_to_uniform is biased upwards near uniform by about tv_floor; tv_excess takes the floor off."""
    rng = np.random.default_rng(1)
    runs = [fairness_metrics(rng.integers(0, 10, 500), 10, [4], resamples=0, seed=0) for _ in range(2000)]
    tv, excess = np.mean([m["tv_to_uniform"] for m in runs]), np.mean([m["tv_excess"] for m in runs])
    assert tv == pytest.approx(tv_floor(500, 10), abs=0.002) and tv > 0.045
    assert excess == pytest.approx(0.0, abs=0.002)
    m = fairness_metrics(np.array([0, 0, 1, 3] * 25), 4, [1], resamples=200, seed=1)
    assert m["tv_excess"] == pytest.approx(0.25 - tv_floor(100, 4))
    assert m["tv_excess_ci"] == pytest.approx([v - tv_floor(100, 4) for v in m["tv_to_uniform_ci"]])


def test_fd_floor_is_the_rms_fd_of_uniform_generators():
    rng = np.random.default_rng(2)
    sims = np.array([fd_to_uniform(class_shares(rng.integers(0, 10, 500), 10)) for _ in range(4000)])
    assert fd_floor(500, 10) == pytest.approx(np.sqrt((sims ** 2).mean()), rel=0.02)


@pytest.mark.parametrize("metric, floor", [("tv_to_uniform", tv_floor), ("fd", fd_floor)])
def test_samples_needed_is_the_first_n_whose_floor_is_under_the_target(metric, floor):
    for target in (0.2, 0.05, 0.02):
        n = samples_needed(metric, target, 10)
        assert floor(n, 10) < target <= floor(n - 1, 10)
        assert floor(int(n * 0.9), 10) >= target  # well below n the floor is above the target
    assert samples_needed("fd", 0.03, 10) == 1001  # 0.9 / n < 0.03 ** 2


def test_a_perfect_prediction_stays_under_its_floor_95_percent_of_the_time():
    """The floor of the theory check, against perfect predictions simulated apart (other seeds, the check's own
    arithmetic): measured shares are n samples of the predicted ones; from the baseline, q is sampled too."""
    rng = np.random.default_rng(3)
    q, lam = np.array([0.12, 0.12, 0.12, 0.04, 0.04, 0.12, 0.04, 0.12, 0.14, 0.14]), {3: 0.3, 4: 0.25, 6: 0.35}
    p = predicted_shares(q.tolist(), lam)
    floor = prediction_error_floor(p, 1000)
    errors = [np.abs(rng.multinomial(1000, p) / 1000 - p).max() for _ in range(4000)]
    assert np.mean(np.array(errors) <= floor) == pytest.approx(0.95, abs=0.015)
    assert 0.02 < floor < 0.04  # the 0.034 at 1,000 images: the 0.026 of a reproduction is noise
    base_floor = prediction_error_floor(p, 1000, q, 1000, lam)
    errors = [np.abs(rng.multinomial(1000, p) / 1000
                     - predicted_shares((rng.multinomial(1000, q) / 1000).tolist(), lam)).max() for _ in range(4000)]
    assert np.mean(np.array(errors) <= base_floor) == pytest.approx(0.95, abs=0.015) and base_floor > floor
    assert prediction_error_floor(p, 4000) == pytest.approx(floor / 2, rel=0.15)  # noise falls as 1/sqrt(n)
