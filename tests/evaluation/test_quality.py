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

    balanced = quality_metrics(*gen([0.25] * 4), ref, ref_labels, **kw)
    skewed = quality_metrics(*gen([0.55, 0.15, 0.15, 0.15]), ref, ref_labels, **kw)
    assert skewed["fid"] > balanced["fid_ci"][1]  # FID against a balanced reference moves with the mix ...
    for key in ("precision", "fid_class_mean"):  # ... precision and the per-class FID do not
        lo, hi = balanced[f"{key}_ci"]
        assert lo <= skewed[key] <= hi, (key, skewed[key], balanced[f"{key}_ci"])
    for key in ("fid", "fid_data", "fid_class_mean", "precision", "recall"):
        lo, hi = balanced[f"{key}_ci"]
        assert lo <= balanced[key] <= hi and lo < hi


def test_data_mix_reference_follows_the_training_priors():
    y = np.repeat(np.arange(4), 20)  # balanced reference, 20 per class
    idx = data_mix_indices(y, [0.4, 0.1, 0.4, 0.1])
    assert np.bincount(y[idx], minlength=4).tolist() == [20, 5, 20, 5]
    assert len(set(idx.tolist())) == len(idx)
    assert np.bincount(y[data_mix_indices(y, [0.25] * 4)]).tolist() == [20] * 4
