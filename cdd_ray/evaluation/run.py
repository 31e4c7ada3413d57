"""One model's evaluation: sample, label, and measure fairness and quality with their intervals.

FID uses clean-fid's Inception network when its weights are on disk (``eval.inception_path`` or
clean-fid's default ``/tmp/inception-2015-12-05.pt``); otherwise the classifier's penultimate
features. The two scales are not comparable, so every result records ``fid_features``. Quality in that
feature space: ``fid`` against the class-balanced held-out reference (the paper's; it rewards fairness as
well as quality), ``fid_data`` against a held-out reference with the training data's class mix, and two
measures that do not move with the class mix: ``precision`` (with ``recall``) and ``fid_class_mean``.
Over-fitting (``cdd_ray.evaluation.overfitting``): the copy rate and the generalization gap of the minority classes
together (all classes when there are none), per class in ``overfitting_by_class``; not measured for latent
diffusion (the split keeps its training images as latents only).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn as nn

from cdd_ray.checkpoint import load_model
from cdd_ray.config import Config, ConfigError, EvalConfig
from cdd_ray.core.dual import predicted_shares
from cdd_ray.data import Split, to_uint8
from cdd_ray.evaluation.fairness import class_shares, fairness_metrics, prediction_error_floor, tv_between
from cdd_ray.evaluation.labeller import (DigitClassifier, classifier_features, external_classifier, get_classifier,
                                         inception_features, inception_weights, predict)
from cdd_ray.evaluation.overfitting import overfitting_metrics
from cdd_ray.evaluation.quality import data_mix_indices, quality_metrics
from cdd_ray.evaluation.sampling import denoising_loss, distance_to, sample
from cdd_ray.model import decode, load_vae


@dataclass
class Evaluation:
    summary: dict
    images: np.ndarray  # uint8 N x S x S
    labels: np.ndarray  # classifier predictions (class ids)
    # What a sweep compares runs with (evaluation.npz; cdd_ray.compare): per generated sample its class position,
    # precision hit and copy flags, the bootstrap draws of the FIDs, the generalization gap's paired differences.
    # Runs sampled from the same seed share their initial noise sample by sample, so their per-sample arrays pair
    # up; runs evaluated on one split with one seed share the gap's images, noise and timesteps.
    record: dict[str, np.ndarray]


def evaluate(ema_unet: nn.Module, noise_scheduler, split: Split, cfg: Config, lam: dict[str, float],
             device: torch.device | str = "cpu") -> Evaluation:
    """Sample ``eval.n_samples`` images, label them, and measure fairness and quality (see the module doc)."""
    e = cfg.eval
    t0 = time.perf_counter()
    clf, acc = get_classifier(split, cfg, device)
    t_clf = time.perf_counter() - t0
    sample_seed = cfg.optim.draws_seed + 1  # a training-seed replicate samples its own noise too
    x = sample(ema_unet, noise_scheduler, e.n_samples, e.sampler_steps, e.batch_size, sample_seed, device)
    if cfg.model.vae:  # latent diffusion: classify and compare decoded images
        x = decode(load_vae(cfg.model.vae, device), x)
    t_sample = time.perf_counter() - t0 - t_clf
    labeller, label_acc = clf, acc
    if e.classifier_path:
        labeller = external_classifier(e.classifier_path, len(split.classes))
        label_acc = float((predict(labeller, split.clf_test) == split.clf_test_labels).float().mean())
    pos = predict(labeller, x).numpy()
    k = len(split.classes)
    minority_pos = [split.classes.index(c) for c in cfg.data.minority_classes]
    fairness = fairness_metrics(pos, k, minority_pos, e.bootstrap, cfg.optim.seed + 3)
    images = to_uint8(x)
    features, fid_features = feature_map(e, clf, device)
    gen_f, ref_f = features(x), features(split.reference)
    data_idx = data_mix_indices(split.reference_labels, split.priors)
    t_quality = time.perf_counter()
    quality, record = quality_metrics(gen_f, pos, ref_f, np.asarray(split.reference_labels), data_idx, split.classes, e.pr_k,
                              e.class_fid_samples, e.bootstrap, cfg.optim.seed + 4)
    t_quality = time.perf_counter() - t_quality
    t_over = time.perf_counter()
    overfitting, overfitting_record = ({}, {}) if cfg.model.vae else overfitting_metrics(
        x, gen_f, pos, split.objective, features(split.objective), split.objective_labels.numpy(), split.reference,
        ref_f, split.reference_labels.numpy(), ema_unet, noise_scheduler, split.classes, minority_pos,
        cfg.optim.draws_seed + 5)
    t_over = time.perf_counter() - t_over
    lam_by_pos = {split.classes.index(split.constraint_classes[n]): v for n, v in lam.items()
                  if n in split.constraint_classes}
    summary = {
        "class_ids": split.classes,
        **fairness,
        **theory_check(fairness["class_shares"], split.priors, e.baseline_shares, lam_by_pos, e.n_samples),
        "objective_shares": split.priors,
        "minority_classes": list(cfg.data.minority_classes),
        **quality,
        **overfitting,
        "fid_features": fid_features,
        "fid_reference_size": int(split.reference.shape[0]),
        "fid_data_reference_size": int(len(data_idx)),
        "n_samples": int(e.n_samples),
        "sample_seed": int(sample_seed),  # the initial noise of sample i is the same in every run with this seed
        "intervals": {"level": 0.95, "resamples": int(e.bootstrap),
                      "method": "percentile bootstrap over the generated samples; FIDs also over the reference, "
                                "re-centred on the measured value"},
        "sampler": f"ddim-{e.sampler_steps}",
        "classifier_accuracy": label_acc,  # of the model that labels the samples
        "classifier": e.classifier_path or "trained",
        "trained_classifier_accuracy": acc,
        "minority_losses": minority_losses(ema_unet, noise_scheduler, split, cfg),
        "classifier_test_size": int(split.clf_test.shape[0]),
        "eval_s": {"classifier": t_clf, "sampling": t_sample, "quality": t_quality, "overfitting": t_over,
                   "total": time.perf_counter() - t0},
    }
    if cfg.is_finetune:
        summary.update(finetune_metrics(ema_unet, noise_scheduler, split, cfg, clf, fairness["class_shares"], device))
    labels = np.array([split.classes[i] for i in pos.tolist()], dtype=np.int64)
    return Evaluation(summary=summary, images=images, labels=labels,
                      record={"class_positions": pos, **record, **overfitting_record})


def feature_map(e: EvalConfig, clf: DigitClassifier, device: torch.device | str
                ) -> tuple[Callable[[torch.Tensor], np.ndarray], str]:
    """The FID features images are compared in, and their name: Inception's where the driver chose them (or
    "auto" finds the weights), else the labeller's penultimate layer."""
    weights = inception_weights(e) if e.fid_features in ("auto", "inception") else None
    if e.fid_features == "inception" and weights is None:  # chosen by the driver: never other features here
        raise ConfigError(f"eval.fid_features=inception: no Inception weights at eval.inception_path="
                          f"{e.inception_path!r} (nor clean-fid's default place)")
    if weights is not None:
        return (lambda imgs: inception_features(to_uint8(imgs), weights, device)), "inception"
    return (lambda imgs: classifier_features(clf, imgs)), "classifier"


def minority_losses(ema_unet: nn.Module, noise_scheduler, split: Split, cfg: Config) -> dict[str, float]:
    """The EMA model's denoising loss on each minority class's training images (``class_<c>``)."""
    obj = split.objective
    return {f"class_{c}": denoising_loss(ema_unet, noise_scheduler, obj[split.objective_labels == i],
                                         cfg.optim.seed + 2)
            for i, c in enumerate(split.classes) if c in cfg.data.minority_classes}


def theory_check(measured: list[float], priors: list[float], baseline: list[float],
                 lam_by_pos: dict[int, float], n: int, baseline_n: int | None = None) -> dict:
    """Theorem 1's class shares from lambda, with q = the training data's class mix (``predicted_shares``) and, when
    the baseline's measured shares are known, with q = those (``predicted_shares_from_baseline``), and the largest
    per-class error of each against the ``n`` measured shares. The first mixes the model's own error (the
    unconstrained model already misses q) with the theory's; the second leaves the theory's. Each error comes with
    its floor (``<error>_floor``): the 95th percentile of the error of an exactly right prediction measured with
    ``n`` samples (and, from the baseline, q measured with ``baseline_n``, default ``n``)."""
    if not lam_by_pos:
        return {"predicted_shares": None}
    out: dict = {"predicted_shares": predicted_shares(priors, lam_by_pos)}
    out["prediction_error_floor"] = prediction_error_floor(out["predicted_shares"], n)
    if baseline:
        out["predicted_shares_from_baseline"] = predicted_shares(baseline, lam_by_pos)
        out["prediction_error_baseline_floor"] = prediction_error_floor(
            out["predicted_shares_from_baseline"], n, baseline, baseline_n or n, lam_by_pos)
    for key, name in (("predicted_shares", "prediction_error"),
                      ("predicted_shares_from_baseline", "prediction_error_baseline")):
        if key in out:
            out[name] = max(abs(m - p) for m, p in zip(measured, out[key]))
    return out


def finetune_metrics(ema_unet: nn.Module, noise_scheduler, split: Split, cfg: Config, clf: DigitClassifier,
                     shares: list[float], device: torch.device | str = "cpu") -> dict:
    """Learning the new classes vs keeping the old ones, against the pre-trained model.

    new_share / old_share: generated shares of the new and old classes; forgetting = 1 - old_share / the
    pre-trained model's old_share (0: old digits as often as before; 1: none left); old_tv_to_pretrained:
    tv between the old-class mixes of this and the pre-trained model; train/held-out denoising loss on
    the new classes (their gap is the over-fitting signal); distance_to_pretrained: the constraint's value
    on fixed Gaussian inputs.
    """
    e, f = cfg.eval, cfg.finetune
    new_pos = [split.classes.index(c) for c in f.new_classes]
    old_pos = [i for i in range(len(split.classes)) if i not in new_pos]
    pre, _, _ = load_model(f.pretrained, ema=True)
    pre.to(device).eval()
    x_pre = sample(pre, noise_scheduler, e.n_samples, e.sampler_steps, e.batch_size, cfg.optim.seed + 1, device)
    pre_shares = class_shares(predict(clf, x_pre), len(split.classes))
    old, pre_old = sum(shares[i] for i in old_pos), sum(pre_shares[i] for i in old_pos)
    new_ref = split.reference[torch.isin(split.reference_labels, torch.tensor(new_pos))]
    seed = cfg.optim.seed + 2
    return {
        "new_share": sum(shares[i] for i in new_pos),
        "old_share": old,
        "pretrained_shares": pre_shares,
        "pretrained_old_share": pre_old,
        "forgetting": max(0.0, 1.0 - old / pre_old) if pre_old > 0 else 1.0,
        "old_tv_to_pretrained": tv_between([shares[i] for i in old_pos], [pre_shares[i] for i in old_pos]),
        "train_loss_new": denoising_loss(ema_unet, noise_scheduler, split.objective, seed),
        "heldout_loss_new": denoising_loss(ema_unet, noise_scheduler, new_ref, seed),
        "heldout_new_size": int(new_ref.shape[0]),
        "distance_to_pretrained": distance_to(ema_unet, pre, noise_scheduler, split.objective.shape[1:], seed),
    }
