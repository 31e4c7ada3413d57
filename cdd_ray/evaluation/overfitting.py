"""Over-fitting: does a model copy its training images, and does it denoise them better than images it never saw?

Two measures, per class and for a group of classes together (the minority classes; all classes), each with its 95%
interval; the class of a generated sample is the labeller's:

- **copy rate**: the share of generated samples that are near-copies of a training image. A sample of class c is
  a copy when its distance to the nearest training image of class c is below the ``COPY_PERCENTILE``-th percentile
  of the same distance for held-out real images of class c (never trained on). The threshold is calibrated on real
  images, so no distance is a magic number: a model whose samples are as far from the training set as unseen real
  images scores about the percentile, the measure's **floor** (``copy_floor``: the share of the held-out images
  themselves under the threshold); a model that returns training images scores 1. Measured in the model's pixel
  space (exact copies) and in the feature space of the FID features (copies up to what those features see).
  Interval: Wilson's score interval of a binomial share over the generated samples. The thresholds are the same
  for every model evaluated on the same split, so when two models are compared they are no source of noise.
- **generalization gap**: per class, the denoising loss on held-out real images minus the loss on the class's
  training images (the paper's notion of over-fitting in its fine-tuning task; 0 for a model that generalises,
  positive when it denoises its training images better). ``GAP_IMAGES_PER_CLASS`` images of each set (the
  class's smaller set decides), ``GAP_REPEATS`` draws of noise and timestep per image: image i of the held-out set
  and image i of the training set get the same noise and timestep, so the timestep's large effect on the loss
  cancels in their difference. Interval: normal, over those paired differences.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from cdd_ray.evaluation.sampling import batch_losses

COPY_PERCENTILE = 1.0  # a copy: nearer a training image of its class than 1% of held-out real images are
GAP_IMAGES_PER_CLASS = 64  # images of each set per class for the generalization gap (the cpu preset's minority count)
GAP_REPEATS = 2  # noise and timestep draws per image
Z95 = 1.959964


def nearest_distances(x: torch.Tensor, pool: torch.Tensor, chunk: int = 1024) -> np.ndarray:
    """Euclidean distance from each row of ``x`` (N x ...) to its nearest row of ``pool`` (M x ...), flattened."""
    x, pool = x.reshape(x.shape[0], -1).float(), pool.reshape(pool.shape[0], -1).float()
    return torch.cat([torch.cdist(x[i:i + chunk], pool).min(dim=1).values
                      for i in range(0, x.shape[0], chunk)]).numpy() if x.shape[0] else np.zeros(0)


def copy_thresholds(train: torch.Tensor, train_pos: np.ndarray, heldout: torch.Tensor, heldout_pos: np.ndarray,
                    percentile: float = COPY_PERCENTILE) -> dict[int, tuple[float, float]]:
    """Per class position present in both sets: (the distance under which a sample is a copy, the floor: the share
    of that class's held-out images under it)."""
    out = {}
    for c in sorted(set(np.unique(train_pos)) & set(np.unique(heldout_pos))):
        d = nearest_distances(heldout[heldout_pos == c], train[train_pos == c])
        threshold = float(np.percentile(d, percentile))
        out[int(c)] = (threshold, float(np.mean(d < threshold)))
    return out


def copies(gen: torch.Tensor, gen_pos: np.ndarray, train: torch.Tensor, train_pos: np.ndarray,
           thresholds: dict[int, tuple[float, float]]) -> np.ndarray:
    """Per generated sample: 1.0 a copy, 0.0 not, NaN when its class has no threshold."""
    out = np.full(len(gen_pos), np.nan)
    for c, (threshold, _) in thresholds.items():
        mask = gen_pos == c
        if mask.any():
            out[mask] = nearest_distances(gen[torch.from_numpy(mask)], train[train_pos == c]) < threshold
    return out


def wilson(k: int, n: int) -> list[float]:
    """95% Wilson score interval of a share of ``k`` in ``n`` (n > 0)."""
    p = k / n
    centre = (p + Z95 ** 2 / (2 * n)) / (1 + Z95 ** 2 / n)
    half = Z95 * math.sqrt(p * (1 - p) / n + Z95 ** 2 / (4 * n * n)) / (1 + Z95 ** 2 / n)
    return [0.0 if k == 0 else max(0.0, centre - half), 1.0 if k == n else min(1.0, centre + half)]


def copy_rate(flags: np.ndarray, pos: np.ndarray, classes: list[int]) -> tuple[float | None, list[float] | None, int]:
    """The copy rate of the samples of the class positions ``classes``: (rate, 95% interval, samples); None for
    no samples."""
    f = flags[np.isin(pos, classes) & ~np.isnan(flags)]
    k, n = int(f.sum()), len(f)
    return (k / n, wilson(k, n), n) if n else (None, None, 0)


@torch.no_grad()
def paired_losses(unet: nn.Module, noise_scheduler, a: torch.Tensor, b: torch.Tensor, seed: int,
                  repeats: int = GAP_REPEATS, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Per image, the mean denoising loss of ``unet`` on ``a`` and on ``b`` (same length) over ``repeats`` draws,
    image i of ``a`` and image i of ``b`` with the same noise and timestep."""
    unet.eval()
    g = torch.Generator().manual_seed(seed)
    la, lb = np.zeros(a.shape[0]), np.zeros(a.shape[0])
    for _ in range(repeats):
        noise = torch.randn(a.shape, generator=g)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (a.shape[0],), generator=g)
        for losses, x in ((la, a), (lb, b)):
            for i in range(0, x.shape[0], batch_size):
                s = slice(i, i + batch_size)
                losses[s] += batch_losses(unet, noise_scheduler, x[s], noise[s], t[s]).numpy() / repeats
    return la, lb


def gap_differences(unet: nn.Module, noise_scheduler, train: torch.Tensor, train_pos: np.ndarray,
                    heldout: torch.Tensor, heldout_pos: np.ndarray, seed: int,
                    per_class: int = GAP_IMAGES_PER_CLASS) -> dict[int, np.ndarray]:
    """Per class position present in both sets: the paired differences held-out loss - training loss of up to
    ``per_class`` images of each (a seeded random choice)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for c in sorted(set(np.unique(train_pos)) & set(np.unique(heldout_pos))):
        tr, ho = train[torch.from_numpy(train_pos == c)], heldout[torch.from_numpy(heldout_pos == c)]
        n = min(per_class, tr.shape[0], ho.shape[0])
        tr = tr[torch.randperm(tr.shape[0], generator=g)[:n]]
        ho = ho[torch.randperm(ho.shape[0], generator=g)[:n]]
        held_loss, train_loss = paired_losses(unet, noise_scheduler, ho, tr, seed + 1 + int(c))
        out[int(c)] = held_loss - train_loss
    return out


def mean_interval(d: np.ndarray) -> tuple[float | None, list[float] | None]:
    """Mean and normal 95% interval of ``d``; None for fewer than 2 values."""
    if len(d) < 2:
        return None, None
    m, half = float(d.mean()), Z95 * float(d.std(ddof=1)) / math.sqrt(len(d))
    return m, [m - half, m + half]


def overfitting_metrics(gen: torch.Tensor, gen_features: np.ndarray, gen_pos: np.ndarray, train: torch.Tensor,
                        train_features: np.ndarray, train_pos: np.ndarray, heldout: torch.Tensor,
                        heldout_features: np.ndarray, heldout_pos: np.ndarray, unet: nn.Module, noise_scheduler,
                        classes: list[int], group: list[int], seed: int
                        ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Both measures for one model (see the module's doc): ``gen`` its samples (the model's space, as ``train`` and
    ``heldout``), the ``*_features`` their FID features, ``*_pos`` class positions, ``classes`` the class ids by
    position, ``group`` the positions reported together as the headline values (the minority classes; all when
    empty). Returns the summary's keys: ``copy_rate``, ``copy_rate_features``, ``generalization_gap`` (the group's,
    each with ``_ci``), ``copy_floor`` / ``copy_floor_features``, ``overfitting_seed`` and ``overfitting_by_class``
    ({class id: each value, interval and count}); and the record a comparison of two models pairs
    (``cdd_ray.compare``): each sample's copy flags (``copy_flags``, ``copy_flags_features``: 1, 0, NaN) and the
    group's paired loss differences (``gap_differences``: the same images, noise and timesteps in every model
    evaluated on one split with one seed)."""
    group = group or list(range(len(classes)))
    flags, floors = {}, {}
    for name, (g, tr, ho) in {"pixels": (gen, train, heldout),
                              "features": tuple(torch.as_tensor(f) for f in (gen_features, train_features,
                                                                            heldout_features))}.items():
        th = copy_thresholds(tr, train_pos, ho, heldout_pos)
        flags[name] = copies(g, gen_pos, tr, train_pos, th)
        counts = {c: int(np.sum(gen_pos == c)) for c in group if c in th}  # the group's floor: by its samples
        floors[name] = (sum(th[c][1] * k for c, k in counts.items()) / sum(counts.values())
                        if sum(counts.values()) else None)
    gaps = gap_differences(unet, noise_scheduler, train, train_pos, heldout, heldout_pos, seed)
    by_class = {}
    for c, cid in enumerate(classes):
        rate, ci, n = copy_rate(flags["pixels"], gen_pos, [c])
        rate_f, ci_f, _ = copy_rate(flags["features"], gen_pos, [c])
        gap, gap_ci = mean_interval(gaps.get(c, np.zeros(0)))
        by_class[str(cid)] = {"copy_rate": rate, "copy_rate_ci": ci, "copy_rate_features": rate_f,
                              "copy_rate_features_ci": ci_f, "samples": n, "generalization_gap": gap,
                              "generalization_gap_ci": gap_ci, "gap_images": int(len(gaps.get(c, [])))}
    rate, ci, n = copy_rate(flags["pixels"], gen_pos, group)
    rate_f, ci_f, _ = copy_rate(flags["features"], gen_pos, group)
    group_gaps = np.concatenate([gaps[c] for c in group if c in gaps] or [np.zeros(0)])
    gap, gap_ci = mean_interval(group_gaps)
    summary = {"copy_rate": rate, "copy_rate_ci": ci, "copy_rate_features": rate_f, "copy_rate_features_ci": ci_f,
               "copy_floor": floors["pixels"], "copy_floor_features": floors["features"],
               "copy_percentile": COPY_PERCENTILE, "copy_samples": n,
               "generalization_gap": gap, "generalization_gap_ci": gap_ci, "overfitting_seed": seed,
               "overfitting_classes": [classes[c] for c in group], "overfitting_by_class": by_class}
    return summary, {"copy_flags": flags["pixels"], "copy_flags_features": flags["features"],
                     "gap_differences": group_gaps}
