"""Comparisons between a sweep's runs (cdd_ray.compare): one class set for the class-mean quality, and the interval
of each difference, checked against simulations done here (not the module's own arithmetic)."""

import warnings

import numpy as np
import pytest

from cdd_ray.compare import Evaluated, common_classes, difference, differences, load, restate_class_quality
from cdd_ray.front import format_differences, verdict

CLASSES = [0, 1, 2, 3]


def run(pos, hits=None, seed=7, draws=None, fid_per_class=None, minority=(3,), resamples=400):
    pos = np.asarray(pos)
    summary = {"class_ids": CLASSES, "sample_seed": seed, "minority_classes": list(minority),
               "intervals": {"resamples": resamples}, "fid_per_class": fid_per_class or {},
               "precision": float(np.mean(hits)) if hits is not None else None}
    record = {"class_positions": pos,
              "precision_hits": np.ones(len(pos), bool) if hits is None else np.asarray(hits, bool)}
    if draws is not None:
        record["fid_class_draws"] = draws
    return Evaluated(summary, record)


def test_a_paired_difference_is_shown_where_the_two_intervals_overlap():
    """Two runs from the same initial noise: the second samples 3% of the first's images of its largest class as the
    minority class instead. Each run's own 95% interval of its minority share overlaps the other's (the front's old
    'within the intervals of'); the interval of the paired difference excludes 0 and holds the true +0.03 shift."""
    rng = np.random.default_rng(0)
    n = 500
    a = rng.choice(4, n, p=[0.3, 0.3, 0.3, 0.1])
    b = a.copy()
    b[np.flatnonzero(a == np.bincount(a).argmax())[:15]] = 3
    ra, rb = run(a), run(b)
    d = difference("minority_share", rb, ra, [])
    assert d[0] == pytest.approx(0.03)
    assert 0 < d[1] < 0.03 < d[2] and verdict("minority_share", d) == "worse"  # a larger minority share: not minimised
    own = [np.percentile(rng.binomial(n, p, 4000) / n, [2.5, 97.5]) for p in ((a == 3).mean(), (b == 3).mean())]
    assert own[0][1] > own[1][0]  # the two runs' own intervals overlap
    d_tv = difference("tv_to_uniform", rb, ra, [])
    assert d_tv[2] < 0 and verdict("tv_to_uniform", d_tv) == "better"  # closer to uniform
    # sampled from other noise (another seed), the same arrays are compared as independent: a wider interval
    wide = difference("minority_share", run(b, seed=8), ra, [])
    assert wide[2] - wide[1] > 2 * (d[2] - d[1]) and wide[1] < 0 < wide[2]


def test_the_interval_of_an_independent_difference_covers_the_truth_95_percent_of_the_time():
    """Precision of two independent runs, true values 0.80 and 0.75: coverage of the difference's interval,
    simulated."""
    rng = np.random.default_rng(1)
    covered = []
    for i in range(150):
        pa, pb = rng.random(400) < 0.80, rng.random(400) < 0.75
        d = difference("precision", run(np.zeros(400, int), pa, seed=1, resamples=300),
                       run(np.zeros(400, int), pb, seed=2, resamples=300), [], seed=i)
        covered.append(d[1] <= 0.05 <= d[2])
    assert np.mean(covered) == pytest.approx(0.95, abs=0.05)


def test_class_mean_quality_is_restated_over_the_classes_every_run_has():
    """The reference skipped class 3 (too few samples); a trial has it. Both are averaged over 0, 1, 2."""
    rng = np.random.default_rng(2)
    d_ref, d_trial = rng.normal(10, 0.2, (400, 4)), rng.normal(12, 0.2, (400, 4))
    d_ref[:, 3] = np.nan
    ref = run(rng.choice(3, 500), draws=d_ref, fid_per_class={"0": 10.0, "1": 11.0, "2": 12.0})
    trial = run(rng.choice(4, 500), draws=d_trial, fid_per_class={"0": 12.0, "1": 12.0, "2": 12.0, "3": 30.0})
    classes = common_classes([ref, trial])
    assert classes == ["0", "1", "2"]
    row = {"fid_class_mean": 16.5}  # the trial's own mean over its four classes
    restate_class_quality(row, trial, classes)
    assert row["fid_class_mean"] == pytest.approx(12.0) and row["quality_classes"] == "0 1 2"
    lo, hi = row["fid_class_mean_ci"]
    assert lo < 12.0 < hi and hi - lo == pytest.approx(2 * 1.96 * 0.2 / np.sqrt(3), rel=0.15)  # 3 draws, sd 0.2
    d = difference("fid_class_mean", trial, ref, classes)
    assert d[0] == pytest.approx(1.0) and d[1] > 0 and verdict("fid_class_mean", d) == "worse"


def test_precision_class_mean_weighs_classes_alike_whatever_their_shares():
    pos = np.r_[np.zeros(400, int), np.ones(100, int)]
    hits = np.r_[np.ones(400), np.zeros(50), np.ones(50)].astype(bool)  # class 0: 1.0, class 1: 0.5
    row = {}
    restate_class_quality(row, run(pos, hits, fid_per_class={"0": 1.0, "1": 1.0}), ["0", "1"])
    assert row["precision_class_mean"] == pytest.approx(0.75)  # share-weighted precision: 0.9
    assert row["precision_class_mean_ci"][0] < 0.75 < row["precision_class_mean_ci"][1]
    restate_class_quality(row, run(pos, hits), [])  # no class every run has: no class means at all
    assert row["precision_class_mean"] is None and row["fid_class_mean"] is None and row["quality_classes"] == ""


def test_differences_to_each_reference_and_the_printed_table():
    rng = np.random.default_rng(3)
    base = rng.choice(4, 500, p=[0.3, 0.3, 0.3, 0.1])
    fair = base.copy()
    fair[np.flatnonzero(base == np.bincount(base).argmax())[:60]] = 3
    refs = {"baseline": run(base), "baseline-rebalanced": run(fair)}
    diffs = differences(refs["baseline-rebalanced"], refs, ("tv_to_uniform",), [])
    assert list(diffs) == ["baseline"]  # not against itself
    row = {"role": "trial", "trial_id": "abc", "number": 3,
           "differences": differences(run(fair), refs, ("tv_to_uniform", "precision"), [])}
    table = format_differences([row], [{"role": "baseline"}, {"role": "baseline-rebalanced"}],
                               ("precision", "tv_to_uniform"))
    assert "| point | precision - baseline | tv_to_uniform - baseline | precision - baseline-rebalanced |" in table
    line = next(x for x in table.splitlines() if x.startswith("| t03 abc"))
    assert "better" in line.split("|")[3]  # fairer than the unconstrained baseline, shown
    assert line.split("|")[4].strip().startswith("+0.000 [+0.000, +0.000]")  # the same samples as the rebalanced


def test_load_reads_what_a_run_wrote_and_skips_runs_without_a_record(tmp_path):
    import json

    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "summary.json").write_text(json.dumps({"class_ids": CLASSES}))
    assert load(str(tmp_path / "a")) is None  # a run from before evaluation.npz
    np.savez_compressed(tmp_path / "a" / "evaluation.npz", class_positions=np.array([0, 1, 3]),
                        precision_hits=np.array([True, False, True]))
    got = load(str(tmp_path / "a"))
    assert got.positions.tolist() == [0, 1, 3] and got.summary["class_ids"] == CLASSES


def overfit_run(pos, flags, gaps, seed=7, gap_seed=5):
    r = run(pos, seed=seed)
    r.summary.update(overfitting_classes=[3], overfitting_seed=gap_seed)
    r.record.update(copy_flags=np.asarray(flags, float), copy_flags_features=np.asarray(flags, float),
                    gap_differences=np.asarray(gaps, float))
    return r


def test_copy_rate_differences_pair_the_samples_of_the_overfitting_classes():
    """Same noise, same labels: the second run copies 12 more of its 100 minority samples. The difference counts
    the minority samples only (the majority's flags do not enter), holds +0.12, and its paired interval is narrower
    than the independent one (another sample seed)."""
    rng = np.random.default_rng(2)
    pos = np.r_[np.zeros(300, int), np.full(100, 3)]
    fa = np.r_[np.ones(300), (rng.random(100) < 0.05).astype(float)]  # majority flags all 1: must not count
    fb = fa.copy()
    fb[300 + np.flatnonzero(fa[300:] == 0)[:12]] = 1.0
    d = difference("copy_rate", overfit_run(pos, fb, [0.0, 0.0]), overfit_run(pos, fa, [0.0, 0.0]), [])
    assert d[0] == pytest.approx(0.12) and 0 < d[1] < 0.12 < d[2] and verdict("copy_rate", d) == "worse"
    wide = difference("copy_rate", overfit_run(pos, fb, [0.0, 0.0], seed=9), overfit_run(pos, fa, [0.0, 0.0]), [])
    assert wide[2] - wide[1] > d[2] - d[1]
    none = overfit_run(np.zeros(400, int), fa, [0.0, 0.0])  # no sample of the over-fitting classes: no rate
    assert difference("copy_rate", none, overfit_run(pos, fa, [0.0, 0.0]), []) is None


def test_a_resample_without_samples_of_the_overfitting_classes_is_left_out_silently():
    """2 minority samples in 40 (a smoke evaluation): about 1 resample in 9 draws none. Those resamples have no
    rate and are left out of the interval; nothing is printed (numpy's "Mean of empty slice" was, in every sweep)."""
    pos = np.r_[np.zeros(38, int), np.full(2, 3)]
    a, b = overfit_run(pos, np.r_[np.zeros(38), 1.0, 0.0], [0.0]), overfit_run(pos, np.zeros(40), [0.0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        d = difference("copy_rate", a, b, [])
    assert d[0] == 0.5 and d[1] <= 0.5 <= d[2] and all(np.isfinite(d))


def test_generalization_gap_differences_pair_the_same_images_and_noise():
    """Per-pair gaps that share most of their variation (the same images, noise and timesteps): a shift of 0.01 is
    shown when paired, and not when the runs measured other pairs (another seed: independent resamples)."""
    rng = np.random.default_rng(3)
    shared = rng.normal(0, 0.2, 400)
    ga, gb = shared + rng.normal(0, 0.01, 400), shared + 0.01 + rng.normal(0, 0.01, 400)
    pos = np.full(50, 3)
    d = difference("generalization_gap", overfit_run(pos, np.zeros(50), gb), overfit_run(pos, np.zeros(50), ga), [])
    assert d[0] == pytest.approx(gb.mean() - ga.mean()) and 0 < d[1] < 0.01 < d[2]
    apart = difference("generalization_gap", overfit_run(pos, np.zeros(50), gb, gap_seed=6),
                       overfit_run(pos, np.zeros(50), ga), [])
    assert apart[1] < 0 < apart[2]
