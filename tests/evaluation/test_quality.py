import numpy as np
import pytest

from cdd_ray.evaluation.quality import (class_fids, data_mix_indices, frechet_distance, precision_recall,
                                        quality_metrics)


def test_frechet_distance_by_hand_and_against_clean_fid():
    from cleanfid.fid import frechet_distance as clean_fid

    rng = np.random.default_rng(0)
    a = rng.normal(size=(2000, 4))
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    assert frechet_distance(a, a + 1.0) == pytest.approx(4.0, rel=1e-6)  # mean shift of 1 in 4 dims
    x, y = rng.normal(size=(300, 16)), rng.normal(size=(400, 16)) @ rng.normal(size=(16, 16)) + 0.3
    ref = clean_fid(x.mean(0), np.cov(x, rowvar=False), y.mean(0), np.cov(y, rowvar=False))
    assert frechet_distance(x, y) == pytest.approx(ref, rel=1e-6)


def test_precision_recall_of_a_set_against_itself_and_a_far_cluster():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(200, 8))
    p, r = precision_recall(a, a, k=3)
    assert p.mean() == 1.0 and r.mean() == 1.0
    p, r = precision_recall(a, a + 100.0, k=3)
    assert p.mean() == 0.0 and r.mean() == 0.0


def test_precision_sees_bad_samples_and_recall_sees_missing_modes():
    rng = np.random.default_rng(1)
    real = np.concatenate([rng.normal(size=(200, 2)), rng.normal(size=(200, 2)) + 20])  # two modes
    one_mode = rng.normal(size=(200, 2))  # realistic but covers one mode
    p, r = precision_recall(real, one_mode, k=3)
    assert p.mean() > 0.9 and 0.4 < r.mean() < 0.6
    half_junk = np.concatenate([rng.normal(size=(100, 2)), rng.normal(size=(100, 2)) + 20,
                                rng.normal(size=(200, 2)) - 50])
    p, _ = precision_recall(real, half_junk, k=3)
    assert 0.4 < p.mean() < 0.55


def test_class_fids_skip_classes_with_too_few_samples():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(60, 3)) + np.repeat(np.arange(3), 20)[:, None] * 10
    ref_labels = np.repeat(np.arange(3), 20)
    gen, gen_labels = ref[:45], ref_labels[:45]  # class 2 has 5 samples
    fids, skipped = class_fids(gen, gen_labels, ref, ref_labels, 3, m=20, rng=rng)
    assert skipped == [2] and set(fids) == {0, 1}
    assert all(v == pytest.approx(0.0, abs=1e-9) for v in fids.values())  # the same images as the reference


def test_quality_metrics_do_not_move_with_the_class_mix():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(4, 8)) * 6
    ref_labels = np.repeat(np.arange(4), 150)
    ref = centres[ref_labels] + rng.normal(size=(600, 8))
    kw = dict(data_idx=np.arange(600), classes=[0, 1, 2, 3], k=3, class_samples=30, resamples=100, seed=0)

    def gen(mix):
        labels = rng.choice(4, 600, p=mix)
        return centres[labels] + rng.normal(size=(600, 8)), labels

    balanced, _ = quality_metrics(*gen([0.25] * 4), ref, ref_labels, **kw)
    skewed, _ = quality_metrics(*gen([0.55, 0.15, 0.15, 0.15]), ref, ref_labels, **kw)
    assert skewed["fid"] > balanced["fid_ci"][1]  # FID against a balanced reference moves with the mix ...
    for key in ("precision", "precision_class_mean", "fid_class_mean"):  # ... these do not (equal class precisions)
        lo, hi = balanced[f"{key}_ci"]
        assert lo <= skewed[key] <= hi, (key, skewed[key], balanced[f"{key}_ci"])
    for key in ("fid", "fid_data", "fid_class_mean", "precision", "precision_class_mean", "recall"):
        lo, hi = balanced[f"{key}_ci"]
        assert lo <= balanced[key] <= hi and lo < hi


def test_data_mix_reference_follows_the_training_priors():
    y = np.repeat(np.arange(4), 20)  # balanced reference, 20 per class
    idx = data_mix_indices(y, [0.4, 0.1, 0.4, 0.1])
    assert np.bincount(y[idx], minlength=4).tolist() == [20, 5, 20, 5]
    assert len(set(idx.tolist())) == len(idx)
    assert np.bincount(y[data_mix_indices(y, [0.25] * 4)]).tolist() == [20] * 4


def test_precision_moves_with_the_mix_when_classes_differ_and_precision_class_mean_does_not():
    """Class 0 is generated off the real manifold half of the time, the others on it: the share-weighted precision
    falls as class 0's share grows, the equal-weight mean over classes stays (each within the other's interval)."""
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(4, 8)) * 8
    ref_labels = np.repeat(np.arange(4), 150)
    ref = centres[ref_labels] + rng.normal(size=(600, 8))
    kw = dict(data_idx=np.arange(600), classes=[0, 1, 2, 3], k=3, class_samples=30, resamples=200, seed=0)

    def gen(mix):
        labels = rng.choice(4, 800, p=mix)
        x = centres[labels] + rng.normal(size=(800, 8))
        off = (labels == 0) & (rng.random(800) < 0.5)
        x[off] += 40.0  # far from every real image
        return x, labels

    few, _ = quality_metrics(*gen([0.1, 0.3, 0.3, 0.3]), ref, ref_labels, **kw)
    many, record = quality_metrics(*gen([0.7, 0.1, 0.1, 0.1]), ref, ref_labels, **kw)
    assert few["precision"] - many["precision"] > 0.2  # the mix moved it
    assert many["precision"] < few["precision_ci"][0]
    lo, hi = few["precision_class_mean_ci"]
    assert lo <= many["precision_class_mean"] <= hi and hi - lo < 0.1
    others = np.mean([many["precision_per_class"][c] for c in "123"])
    assert many["precision_per_class"]["0"] == pytest.approx(others / 2, abs=0.07)  # half its samples are off
    # the record: one hit per generated sample; its mean is precision
    assert record["precision_hits"].shape == (800,) and record["precision_hits"].mean() == pytest.approx(many["precision"])


def test_class_fid_draws_are_per_class_and_give_the_mean_interval():
    rng = np.random.default_rng(2)
    ref_labels = np.repeat(np.arange(3), 80)
    ref = rng.normal(size=(240, 4)) + ref_labels[:, None] * 6
    gen_labels = np.r_[np.zeros(100, int), np.ones(100, int), np.full(10, 2)]  # class 2: too few for m = 30
    gen = rng.normal(size=(210, 4)) + gen_labels[:, None] * 6
    m, rec = quality_metrics(gen, gen_labels, ref, ref_labels, data_idx=np.arange(240), classes=[4, 5, 7], k=3,
                             class_samples=30, resamples=100, seed=0)
    draws = rec["fid_class_draws"]
    assert draws.shape == (100, 3) and np.isnan(draws[:, 2]).all() and np.isfinite(draws[:, :2]).all()
    assert m["fid_class_skipped"] == [7] and set(m["fid_per_class"]) == {"4", "5"}
    lo, hi = m["fid_class_mean_ci"]
    assert lo <= m["fid_class_mean"] <= hi
    shift = draws[:, :2].mean() - m["fid_class_mean"]  # the interval is the draws' percentiles, re-centred
    assert lo == pytest.approx(np.percentile(draws[:, :2].mean(1), 2.5) - shift)
    assert rec["fid_draws"].shape == rec["fid_data_draws"].shape == (100,)
