"""Evaluation: DDIM sampling, the project's own digit classifier, class shares and FID.

FID uses clean-fid's Inception network when its weights are on disk (``eval.inception_path`` or
clean-fid's default ``/tmp/inception-2015-12-05.pt``); otherwise the classifier's penultimate
features. The two scales are not comparable, so every result records ``fid_features``. Two FIDs:
``fid`` against the class-balanced held-out reference (the paper's; it rewards fairness as well as
quality) and ``fid_data`` against a held-out reference with the training data's class mix (fidelity to
the data the model was given; fairness costs some of it).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers import DDPMScheduler

from cdd_ray.config import Config, EvalConfig
from cdd_ray.data import Split, to_uint8
from cdd_ray.dual import predicted_shares
from cdd_ray.model import autocast_for, build_sampler, decode, load_vae

log = logging.getLogger(__name__)

CLEANFID_DEFAULT_INCEPTION = "/tmp/inception-2015-12-05.pt"


# ---------------------------------------------------------------- sampling


@torch.no_grad()
def sample(unet: nn.Module, noise_scheduler, n: int, steps: int, batch_size: int, seed: int,
           device: torch.device | str = "cpu", kind: str = "ddim") -> torch.Tensor:
    """``n`` samples in [-1, 1], shape (n, C, S, S); deterministic for a seed.

    ``kind``: ``ddim`` (deterministic, ``steps`` steps) or ``ddpm`` (ancestral, the schedule's own steps).
    The UNet runs under the training autocast (bf16 on GPUs that support it); the update in fp32.
    """
    unet.eval()
    if kind == "ddim":
        sampler = build_sampler(noise_scheduler)
        sampler.set_timesteps(steps)
    elif kind == "ddpm":
        sampler = DDPMScheduler.from_config(noise_scheduler.config)
        sampler.set_timesteps(noise_scheduler.config.num_train_timesteps)
    else:
        raise ValueError(f"kind: {kind!r} not allowed; allowed: ddim, ddpm")
    amp = autocast_for(torch.device(device))[0]
    cfg = unet.config
    g = torch.Generator(device=device).manual_seed(seed)
    out = []
    for start in range(0, n, batch_size):
        m = min(batch_size, n - start)
        x = torch.randn((m, cfg.in_channels, cfg.sample_size, cfg.sample_size), generator=g, device=device)
        for t in sampler.timesteps:
            with amp:
                eps = unet(x, t.to(device)).sample.float()
            x = sampler.step(eps, t, x, generator=g).prev_sample if kind == "ddpm" else sampler.step(eps, t, x).prev_sample
        out.append(x.clamp(-1, 1).cpu())
    return torch.cat(out)


@torch.no_grad()
def denoising_loss(unet: nn.Module, noise_scheduler, x0: torch.Tensor, seed: int, repeats: int = 4,
                   batch_size: int = 512) -> float:
    """Mean denoising loss of ``unet`` on images ``x0`` (fixed noise and timesteps for a seed)."""
    from cdd_ray.model import add_noise

    unet.eval()
    dev = next(unet.parameters()).device
    g = torch.Generator().manual_seed(seed)
    total, n = 0.0, 0
    for _ in range(repeats):
        for i in range(0, x0.shape[0], batch_size):
            x = x0[i:i + batch_size]
            noise = torch.randn(x.shape, generator=g)
            t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (x.shape[0],), generator=g)
            pred = unet(add_noise(noise_scheduler, x, noise, t).to(dev), t.to(dev)).sample.float().cpu()
            total += (pred - noise).pow(2).mean(dim=(1, 2, 3)).sum().item()
            n += x.shape[0]
    return total / n


# ---------------------------------------------------------------- classifier


class DigitClassifier(nn.Module):
    """Small CNN; ``features`` (128-d penultimate layer) also serve as FID features."""

    def __init__(self, n_classes: int = 10, in_channels: int = 1):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
            nn.Conv2d(64, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
            nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(64 * 16, 128), nn.ReLU(),
        )
        self.head = nn.Sequential(nn.Dropout(0.3), nn.Linear(128, n_classes))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def _augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random shifts of up to 1/8 of the side (padding with background)."""
    s = x.shape[-1]
    pad = max(1, s // 8)
    xp = F.pad(x, (pad, pad, pad, pad), value=-1.0)
    dx, dy = torch.randint(0, 2 * pad + 1, (2,), generator=g).tolist()
    return xp[..., dy:dy + s, dx:dx + s]


def _batched(fn, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    return torch.cat([fn(x[i:i + batch_size]) for i in range(0, x.shape[0], batch_size)])


@torch.no_grad()
def predict(clf: DigitClassifier, x: torch.Tensor) -> torch.Tensor:
    clf.eval()
    return _batched(lambda b: clf(b).argmax(1), x)


@torch.no_grad()
def classifier_features(clf: DigitClassifier, x: torch.Tensor) -> np.ndarray:
    clf.eval()
    return _batched(clf.features, x).double().numpy()


def train_classifier(split: Split, epochs: int, seed: int = 0) -> tuple[DigitClassifier, float]:
    """Train on every real image outside the classifier-test split; return the model and its test accuracy."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    clf = DigitClassifier(len(split.classes), split.clf_train.shape[1])
    opt = torch.optim.Adam(clf.parameters(), lr=2e-3)
    x, y = split.clf_train, split.clf_train_labels
    n_batches = max(1, x.shape[0] // 64)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=epochs * n_batches)
    for _ in range(epochs):
        clf.train()
        perm = torch.randperm(x.shape[0], generator=g)
        for i in range(n_batches):
            idx = perm[i * 64:(i + 1) * 64]
            loss = F.cross_entropy(clf(_augment(x[idx], g)), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    acc = (predict(clf, split.clf_test) == split.clf_test_labels).float().mean().item()
    return clf, acc


def external_classifier(path: str, n_classes: int) -> nn.Module:
    """A user-given TorchScript classifier (``eval.classifier_path``); its output shape is checked on use."""
    try:
        model = torch.jit.load(str(Path(path).expanduser()), map_location="cpu").eval()
    except Exception as e:  # noqa: BLE001
        from cdd_ray.config import ConfigError

        raise ConfigError(f"eval.classifier_path: {path!r} is not a TorchScript model: {e}") from None
    return _CheckedClassifier(model, n_classes, path)


class _CheckedClassifier(nn.Module):
    def __init__(self, model: nn.Module, n_classes: int, path: str):
        super().__init__()
        self.model, self.n_classes, self.path = model, n_classes, path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        if out.dim() != 2 or out.shape[1] != self.n_classes:
            from cdd_ray.config import ConfigError

            raise ConfigError(f"eval.classifier_path: {self.path!r} returned shape {tuple(out.shape)}; expected "
                              f"(N, {self.n_classes}) logits over data.classes")
        return out


def _cache_dir(cfg: EvalConfig) -> Path:
    root = cfg.classifier_cache or os.environ.get("CDD_RAY_CACHE") or "~/.cache/cdd_ray"
    return Path(root).expanduser() / "classifiers"


def get_classifier(split: Split, cfg: Config) -> tuple[DigitClassifier, float]:
    """The classifier for this data source, resolution and split, trained once and cached on disk."""
    key = json.dumps({"source": split.source, "size": cfg.data.image_size, "classes": split.classes,
                      "n_train": int(split.clf_train.shape[0]), "n_test": int(split.clf_test.shape[0]),
                      "train_sum": round(float(split.clf_train.sum()), 3),
                      "epochs": cfg.eval.classifier_epochs, "v": 2}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    path = _cache_dir(cfg.eval) / f"{split.source}-{cfg.data.image_size}px-{digest}.pt"
    if path.exists():
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
            clf = DigitClassifier(len(split.classes), split.clf_train.shape[1])
            clf.load_state_dict(blob["state_dict"])
            return clf, float(blob["accuracy"])
        except Exception as e:  # noqa: BLE001 - a bad cache entry is retrained, not fatal
            log.warning("classifier cache %s unreadable (%s); retraining", path, e)
    clf, acc = train_classifier(split, cfg.eval.classifier_epochs, cfg.optim.seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp-{os.getpid()}")
    torch.save({"state_dict": clf.state_dict(), "accuracy": acc, "key": key}, tmp)
    os.replace(tmp, path)
    return clf, acc


# ---------------------------------------------------------------- metrics


def class_shares(labels: torch.Tensor | np.ndarray, n_classes: int) -> list[float]:
    counts = np.bincount(np.asarray(labels), minlength=n_classes).astype(float)
    return (counts / counts.sum()).tolist()


def tv_to_uniform(shares: list[float]) -> float:
    k = len(shares)
    return 0.5 * float(sum(abs(s - 1.0 / k) for s in shares))


def minority_share(shares: list[float], minority_positions: list[int]) -> float | None:
    """Mean share of the minority classes (None without minority classes)."""
    return float(np.mean([shares[i] for i in minority_positions])) if minority_positions else None


def tv_between(p: list[float], q: list[float]) -> float:
    """Total variation between two distributions given as (unnormalised) shares over the same classes."""
    a, b = np.asarray(p, float), np.asarray(q, float)
    if a.sum() == 0 or b.sum() == 0:
        return 1.0
    return 0.5 * float(np.abs(a / a.sum() - b / b.sum()).sum())


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    from cleanfid.fid import frechet_distance as fd

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # SciPy's sqrtm deprecation notice
        return float(fd(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False)))


def data_mix_indices(reference_labels: torch.Tensor | np.ndarray, priors: list[float]) -> np.ndarray:
    """Indices of a subset of the class-balanced reference whose class mix is ``priors`` (the training data's).

    The most frequent class keeps all its reference images; class c keeps round(n * priors[c] / max prior).
    FID against this subset measures fidelity to the data the model was trained on, whatever its classes'
    balance, while FID against the balanced reference also rewards fairness.
    """
    y = np.asarray(reference_labels)
    n = int(np.bincount(y, minlength=len(priors)).min())
    top = max(priors)
    keep = [np.flatnonzero(y == c)[:max(1, round(n * p / top)) if p > 0 else 0] for c, p in enumerate(priors)]
    return np.concatenate(keep)


def inception_weights(cfg: EvalConfig) -> Path | None:
    """Local clean-fid Inception weights, if any (nothing is downloaded)."""
    for p in (cfg.inception_path, CLEANFID_DEFAULT_INCEPTION):
        if p and Path(p).expanduser().is_file():
            return Path(p).expanduser()
    return None


@torch.no_grad()
def inception_features(images_u8: np.ndarray, weights: Path, device: torch.device | str = "cpu",
                       batch_size: int = 64) -> np.ndarray:
    """clean-fid features: clean (PIL bicubic, float) resize to 299x299, gray -> RGB, Inception pool3."""
    from cleanfid.inception_torchscript import InceptionV3W
    from cleanfid.resize import make_resizer

    model = InceptionV3W(str(weights.parent), download=False).to(device).eval()
    if weights.name != "inception-2015-12-05.pt":
        model.base = torch.jit.load(str(weights)).eval().to(device)
        model.layers = model.base.layers
    resize = make_resizer("PIL", False, "bicubic", (299, 299))
    feats = []
    for i in range(0, len(images_u8), batch_size):
        rgb = [resize(im if im.ndim == 3 else np.repeat(im[:, :, None], 3, axis=2))
               for im in images_u8[i:i + batch_size]]
        x = torch.from_numpy(np.stack(rgb)).permute(0, 3, 1, 2).float().to(device)
        feats.append(model(x).double().cpu().numpy())
    return np.concatenate(feats)


@dataclass
class Evaluation:
    summary: dict
    images: np.ndarray  # uint8 N x S x S
    labels: np.ndarray  # classifier predictions (class ids)


def evaluate(ema_unet: nn.Module, noise_scheduler, split: Split, cfg: Config, lam: dict[str, float],
             device: torch.device | str = "cpu") -> Evaluation:
    """Sample ``eval.n_samples`` images, classify them, and compute shares, tv, minority share and FID."""
    e = cfg.eval
    t0 = time.perf_counter()
    clf, acc = get_classifier(split, cfg)
    t_clf = time.perf_counter() - t0
    x = sample(ema_unet, noise_scheduler, e.n_samples, e.sampler_steps, e.batch_size, cfg.optim.seed + 1, device)
    if cfg.model.vae:  # latent diffusion: classify and compare decoded images
        x = decode(load_vae(cfg.model.vae, device), x)
    t_sample = time.perf_counter() - t0 - t_clf
    labeller, label_acc = clf, acc
    if e.classifier_path:
        labeller = external_classifier(e.classifier_path, len(split.classes))
        label_acc = float((predict(labeller, split.clf_test) == split.clf_test_labels).float().mean())
    pos = predict(labeller, x)
    k = len(split.classes)
    shares = class_shares(pos, k)
    minority_pos = [split.classes.index(c) for c in cfg.data.minority_classes]
    images = to_uint8(x)
    weights = inception_weights(e) if e.fid_features in ("auto", "inception") else None
    if weights is not None:
        gen_f, ref_f = inception_features(images, weights, device), inception_features(to_uint8(split.reference), weights, device)
        fid_features = "inception"
    else:
        gen_f, ref_f = classifier_features(clf, x), classifier_features(clf, split.reference)
        fid_features = "classifier"
    fid = frechet_distance(gen_f, ref_f)
    data_idx = data_mix_indices(split.reference_labels, split.priors)
    fid_data = frechet_distance(gen_f, ref_f[data_idx])
    lam_by_pos = {split.classes.index(split.constraint_classes[n]): v for n, v in lam.items()
                  if n in split.constraint_classes}
    obj = split.objective
    class_losses = {f"class_{c}": denoising_loss(ema_unet, noise_scheduler, obj[split.objective_labels == i],
                                                   cfg.optim.seed + 2)
                    for i, c in enumerate(split.classes) if c in cfg.data.minority_classes}
    summary = {
        "class_ids": split.classes,
        "class_shares": shares,
        "predicted_shares": predicted_shares(split.priors, lam_by_pos) if lam_by_pos else None,
        "objective_shares": split.priors,
        "minority_classes": list(cfg.data.minority_classes),
        "minority_share": minority_share(shares, minority_pos),
        "tv_to_uniform": tv_to_uniform(shares),
        "fid": fid,
        "fid_data": fid_data,  # against a reference with the training data's class mix
        "fid_features": fid_features,
        "fid_reference_size": int(split.reference.shape[0]),
        "fid_data_reference_size": int(len(data_idx)),
        "n_samples": int(e.n_samples),
        "sampler": f"ddim-{e.sampler_steps}",
        "classifier_accuracy": label_acc,  # of the model that labels the samples
        "classifier": e.classifier_path or "trained",
        "trained_classifier_accuracy": acc,
        "minority_losses": class_losses,  # EMA model's denoising loss on each minority class's training images
        "classifier_test_size": int(split.clf_test.shape[0]),
        "eval_s": {"classifier": t_clf, "sampling": t_sample, "total": time.perf_counter() - t0},
    }
    if cfg.is_finetune:
        summary.update(finetune_metrics(ema_unet, noise_scheduler, split, cfg, clf, shares, device))
    labels = np.array([split.classes[i] for i in pos.tolist()], dtype=np.int64)
    return Evaluation(summary=summary, images=images, labels=labels)


def finetune_metrics(ema_unet: nn.Module, noise_scheduler, split: Split, cfg: Config, clf: DigitClassifier,
                     shares: list[float], device: torch.device | str = "cpu") -> dict:
    """Learning the new classes vs keeping the old ones, against the pre-trained model.

    new_share / old_share: generated shares of the new and old classes; forgetting = 1 - old_share / the
    pre-trained model's old_share (0: old digits as often as before; 1: none left); old_tv_to_pretrained:
    tv between the old-class mixes of this and the pre-trained model; train/held-out denoising loss on
    the new classes (their gap is the over-fitting signal); distance_to_pretrained: the constraint's value
    on fixed Gaussian inputs.
    """
    from cdd_ray.checkpoint import load_model

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


@torch.no_grad()
def distance_to(unet: nn.Module, other: nn.Module, noise_scheduler, shape, seed: int, n: int = 512,
                batch_size: int = 256) -> float:
    """E ||eps_unet(x_t, t) - eps_other(x_t, t)||^2 over Gaussian x_t and uniform t (fixed by ``seed``)."""
    unet.eval()
    other.eval()
    dev = next(unet.parameters()).device
    g = torch.Generator().manual_seed(seed)
    total = 0.0
    for i in range(0, n, batch_size):
        m = min(batch_size, n - i)
        x = torch.randn((m, *shape), generator=g)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (m,), generator=g)
        a = unet(x.to(dev), t.to(dev)).sample.float()
        b = other(x.to(dev), t.to(dev)).sample.float()
        total += (a - b).pow(2).mean(dim=(1, 2, 3)).sum().item()
    return total / n
