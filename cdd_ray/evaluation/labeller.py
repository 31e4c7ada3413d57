"""The labeller and feature networks: the project's own classifier (its penultimate features serve FID
when no Inception weights are local), a user-given TorchScript labeller, and clean-fid's Inception.

The classifier trains on ``split.clf_train``, which excludes both the classifier-test split (its accuracy)
and the FID reference (data.split_indices): features that saw the reference would make FID biased.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from cdd_ray.config import Config, ConfigError, EvalConfig
from cdd_ray.data import Split

log = logging.getLogger(__name__)

CLEANFID_DEFAULT_INCEPTION = "/tmp/inception-2015-12-05.pt"


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


def train_classifier(split: Split, epochs: int, seed: int = 0,
                     device: torch.device | str = "cpu") -> tuple[DigitClassifier, float]:
    """Train on ``device`` (the evaluating worker's) on the classifier-training split; return the model (on the
    CPU) and its accuracy on the classifier-test split."""
    dev = torch.device(device)
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    clf = DigitClassifier(len(split.classes), split.clf_train.shape[1]).to(dev)
    opt = torch.optim.Adam(clf.parameters(), lr=2e-3)
    x, y = split.clf_train.to(dev), split.clf_train_labels.to(dev)
    n_batches = max(1, x.shape[0] // 64)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=epochs * n_batches)
    for _ in range(epochs):
        clf.train()
        perm = torch.randperm(x.shape[0], generator=g)
        for i in range(n_batches):
            idx = perm[i * 64:(i + 1) * 64].to(dev)
            loss = F.cross_entropy(clf(_augment(x[idx], g)), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    clf.cpu()
    acc = (predict(clf, split.clf_test) == split.clf_test_labels).float().mean().item()
    return clf, acc


def external_classifier(path: str, n_classes: int) -> nn.Module:
    """A user-given TorchScript classifier (``eval.classifier_path``); its output shape is checked on use."""
    try:
        model = torch.jit.load(str(Path(path).expanduser()), map_location="cpu").eval()
    except Exception as e:  # noqa: BLE001
        raise ConfigError(f"eval.classifier_path: {path!r} is not a TorchScript model: {e}") from None
    return _CheckedClassifier(model, n_classes, path)


class _CheckedClassifier(nn.Module):
    def __init__(self, model: nn.Module, n_classes: int, path: str):
        super().__init__()
        self.model, self.n_classes, self.path = model, n_classes, path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        if out.dim() != 2 or out.shape[1] != self.n_classes:
            raise ConfigError(f"eval.classifier_path: {self.path!r} returned shape {tuple(out.shape)}; expected "
                              f"(N, {self.n_classes}) logits over data.classes")
        return out


def _cache_dir(cfg: EvalConfig) -> Path:
    root = cfg.classifier_cache or os.environ.get("CDD_RAY_CACHE") or "~/.cache/cdd_ray"
    return Path(root).expanduser() / "classifiers"


def get_classifier(split: Split, cfg: Config, device: torch.device | str = "cpu") -> tuple[DigitClassifier, float]:
    """The classifier for this data source, resolution and split, trained once (on ``device``) and cached on
    disk."""
    if split.clf_train.shape[0] == 0:
        raise ValueError("the split has no classifier data: build it with evaluation=True on the evaluating rank")
    key = json.dumps({"source": split.source, "size": cfg.data.image_size, "classes": split.classes,
                      "n_train": int(split.clf_train.shape[0]), "n_test": int(split.clf_test.shape[0]),
                      "train_sum": round(float(split.clf_train.sum()), 3),
                      "epochs": cfg.eval.classifier_epochs, "v": 3}, sort_keys=True)
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
    clf, acc = train_classifier(split, cfg.eval.classifier_epochs, cfg.optim.seed, device)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp-{os.getpid()}")
    torch.save({"state_dict": clf.state_dict(), "accuracy": acc, "key": key}, tmp)
    os.replace(tmp, path)
    return clf, acc


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
