import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from cdd_ray.evaluation.overfitting import (copies, copy_rate, copy_thresholds, gap_differences, mean_interval,
                                            nearest_distances, overfitting_metrics, wilson)
from cdd_ray.model import build_noise_scheduler
from cdd_ray.config import build_config


def test_nearest_distances_by_hand():
    x = torch.tensor([[0.0, 0.0], [3.0, 4.0], [1.0, 1.0]])
    pool = torch.tensor([[0.0, 1.0], [3.0, 0.0]])
    assert nearest_distances(x, pool, chunk=2) == pytest.approx([1.0, 4.0, 1.0])


def test_thresholds_and_copies_by_hand():
    """Class 0 trains on the points 0 and 10 of a line; its held-out points lie 1, 2, 3 and 4 away. The 50th
    percentile of those distances is 2.5: a sample 0.5 from a training point copies it, one 3 away does not, and
    half of the held-out points themselves fall under the threshold (the floor)."""
    train = torch.tensor([[0.0], [10.0], [100.0]])
    train_pos = np.array([0, 0, 1])
    heldout = torch.tensor([[1.0], [8.0], [3.0], [14.0], [101.0]])
    heldout_pos = np.array([0, 0, 0, 0, 1])
    th = copy_thresholds(train, train_pos, heldout, heldout_pos, percentile=50)
    assert th[0] == (pytest.approx(2.5), 0.5)
    assert th[1] == (pytest.approx(1.0), 0.0)
    gen = torch.tensor([[0.5], [13.0], [100.2], [55.0]])
    flags = copies(gen, np.array([0, 0, 1, 2]), train, train_pos, th)
    assert flags[:3].tolist() == [1.0, 0.0, 1.0] and math.isnan(flags[3])  # class 2 has no training image
    assert copy_rate(flags, np.array([0, 0, 1, 2]), [0, 1, 2])[::2] == (pytest.approx(2 / 3), 3)


def test_wilson_interval_by_hand():
    # 0 of 100: [0, 1.96^2 / (100 + 1.96^2)] = [0, 0.0370]; 50 of 100: 0.5 +- 0.0962 (the normal one is 0.098)
    assert wilson(0, 100) == pytest.approx([0.0, 0.03699], abs=1e-4)
    lo, hi = wilson(50, 100)
    assert (lo, hi) == (pytest.approx(0.4038, abs=1e-4), pytest.approx(0.5962, abs=1e-4))


def test_mean_interval_by_hand():
    m, (lo, hi) = mean_interval(np.array([1.0, 2.0, 3.0, 4.0]))
    assert m == 2.5 and hi - m == pytest.approx(1.959964 * np.std([1, 2, 3, 4], ddof=1) / 2)


class Memoriser(nn.Module):
    """A denoiser that knows its training images: it predicts the noise exactly when x_t was made from one of them
    (x_t = sqrt(a) x0 + sqrt(1 - a) eps, solved for eps with the nearest training image as x0), as a model that
    memorised its data does."""

    def __init__(self, train: torch.Tensor, noise_scheduler):
        super().__init__()
        self.images = train.reshape(train.shape[0], -1)
        self.alphas = noise_scheduler.alphas_cumprod
        self.w = nn.Parameter(torch.zeros(1))

    def forward(self, x, t):
        a = self.alphas[t.cpu()].view(-1, 1)
        flat = x.reshape(x.shape[0], -1).cpu()
        eps = (flat[:, None, :] - a.sqrt()[:, :, None] * self.images[None]) / (1 - a).sqrt()[:, :, None]
        best = eps.pow(2).mean(dim=2).argmin(dim=1)  # the training image whose implied noise looks most like noise
        out = eps[torch.arange(len(best)), best].reshape(x.shape)

        class R:
            sample = out
        return R()


def digits(n_per_class: int, seed: int, classes: int = 2) -> tuple[torch.Tensor, np.ndarray]:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n_per_class * classes, 1, 6, 6, generator=g) * 2 - 1
    return x, np.repeat(np.arange(classes), n_per_class)


def test_a_model_that_returns_training_images_copies_and_overfits():
    """Samples that are training images: copy rate 1 in pixels and features; held-out images as samples: about the
    percentile (the floor). A denoiser that memorised its training images: a large positive gap."""
    sched = build_noise_scheduler(build_config("smoke").model)
    train, train_pos = digits(40, 0)
    heldout, heldout_pos = digits(200, 1)
    model = Memoriser(train, sched)
    feats = lambda x: x.reshape(x.shape[0], -1)[:, :8].numpy()  # noqa: E731 - a stand-in feature map
    copied, _ = overfitting_metrics(train, feats(train), train_pos, train, feats(train), train_pos, heldout,
                                 feats(heldout), heldout_pos, model, sched, [3, 7], [1], seed=0)
    assert copied["copy_rate"] == 1.0 and copied["copy_rate_features"] == 1.0
    assert copied["copy_rate_ci"][0] > 0.9 and copied["overfitting_classes"] == [7]
    assert copied["overfitting_by_class"]["3"]["copy_rate"] == 1.0
    assert copied["generalization_gap"] > 0.5 and copied["generalization_gap_ci"][0] > 0.3
    fresh, fresh_pos = digits(200, 2)
    honest, record = overfitting_metrics(fresh, feats(fresh), fresh_pos, train, feats(train), train_pos, heldout,
                                 feats(heldout), heldout_pos, model, sched, [3, 7], [], seed=0)
    assert honest["copy_rate"] <= 0.03 and honest["copy_rate_ci"][0] <= honest["copy_floor"] <= 0.02
    assert honest["copy_samples"] == 400 and honest["overfitting_classes"] == [3, 7]


def test_a_model_that_generalises_has_no_gap():
    """A denoiser that does not depend on its input's data (predicts zero noise): the paired gap's interval
    holds 0."""
    sched = build_noise_scheduler(build_config("smoke").model)
    train, train_pos = digits(40, 0)
    heldout, heldout_pos = digits(40, 1)

    class Zero(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(1))

        def forward(self, x, t):
            class R:
                sample = torch.zeros_like(x)
            return R()

    gaps = gap_differences(Zero(), sched, train, train_pos, heldout, heldout_pos, seed=0)
    assert sorted(gaps) == [0, 1] and len(gaps[0]) == 40
    assert np.allclose(gaps[0], 0.0, atol=1e-6)  # same noise, same prediction: exactly no gap
