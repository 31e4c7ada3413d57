"""``validate``: every field checked before any data, model or Ray work starts; each error names the field, the
value and what is allowed. Pure: it reads nothing from disk, so a worker or a machine without the run's data
checks the config it was given alike; what the fields point at on disk is ``cdd_ray.config.checks``'s, on the
driver. It resolves what a setting implies without disk (every class of MNIST or Celeb-A for ``data.classes:
[]``; an image folder's classes come from ``checks.resolve_from_disk``)."""

from __future__ import annotations

from cdd_ray.config.errors import ConfigError
from cdd_ray.config.presets import PRESETS
from cdd_ray.config.schema import (ANCHOR_INPUTS, DATA_SOURCES, DATASETS, DUAL_KINDS, DUAL_OPTIMIZERS, ETA_SCHEDULES,
                                   FAULT_MODES, FID_FEATURES, MIXES, PRECISIONS, Config, DataConfig)

KNOWN_CLASSES = {"mnist": 10, "celeba": 2}  # an image folder's: its class folders (disk)


def n_classes(d: DataConfig) -> int | None:
    """The dataset's number of classes where the dataset fixes it; None for an image folder (its folders say)."""
    return KNOWN_CLASSES.get(d.dataset)


def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def validate(cfg: Config) -> None:
    d, m, du, o, e = cfg.data, cfg.model, cfg.dual, cfg.optim, cfg.eval
    _require(bool(cfg.name) and "/" not in cfg.name, f"name: {cfg.name!r} must be non-empty without '/'")
    _require(m.preset in PRESETS, f"model.preset: unknown preset {m.preset!r}; allowed: {', '.join(PRESETS)}")
    _require(d.dataset in DATASETS, f"data.dataset: {d.dataset!r} not allowed; allowed: {', '.join(DATASETS)}")
    _require(d.source in DATA_SOURCES, f"data.source: {d.source!r} not allowed; allowed: {', '.join(DATA_SOURCES)}")
    _require(d.mix in MIXES, f"data.mix: {d.mix!r} not allowed; allowed: {', '.join(MIXES)}")
    if d.minority_names:
        _require(d.dataset == "imagefolder", "data.minority_names: only for data.dataset=imagefolder")
    k = n_classes(d)
    if not d.classes and k is not None:  # [] = every class of the dataset
        d.classes = list(range(k))
    _require(len(d.classes) >= 2, f"data.classes: {d.classes} needs at least 2 classes")
    bad = [c for c in d.classes if c < 0 or (k is not None and c >= k)]
    _require(not bad, f"data.classes: unknown class ids {bad}; allowed: "
             + (f"0..{k - 1}" if k is not None else "0 and up (class folders by position)"))
    _require(len(set(d.classes)) == len(d.classes), f"data.classes: duplicate class ids in {d.classes}")
    bad = [c for c in d.minority_classes if c not in d.classes]
    _require(not bad, f"data.minority_classes: {bad} not in data.classes {d.classes}")
    _require(
        len(set(d.minority_classes)) == len(d.minority_classes),
        f"data.minority_classes: duplicate class ids in {d.minority_classes}",
    )
    _require(len(d.minority_classes) < len(d.classes), "data.minority_classes: at least one class must be a majority")
    for key in ("per_class", "minority_count", "classifier_test_per_class", "reference_per_class"):
        v = getattr(d, key)
        _require(v > 0, f"data.{key}: {v} must be a positive integer"
                 + (" (every minority class needs constraint data)" if key == "minority_count" else ""))
    _require(d.minority_count <= d.per_class, f"data.minority_count: {d.minority_count} must be <= data.per_class ({d.per_class})")
    _require(d.image_size >= 8, f"data.image_size: {d.image_size} must be >= 8")

    _require(len(m.channels) >= 2, f"model.channels: {m.channels} needs at least 2 levels")
    _require(all(c > 0 for c in m.channels), f"model.channels: {m.channels} must be positive")
    _require(m.norm_groups > 0 and all(c % m.norm_groups == 0 for c in m.channels),
             f"model.norm_groups: {m.norm_groups} must divide every entry of model.channels {m.channels}")
    if not m.vae:  # with a VAE its downsampling counts too: checks.check_files reads it
        check_image_size(cfg, 1)
    _require(m.layers_per_block >= 1, f"model.layers_per_block: {m.layers_per_block} must be >= 1")
    bad = [a for a in m.attention_levels if not 0 <= a < len(m.channels)]
    _require(not bad, f"model.attention_levels: {bad} out of range 0..{len(m.channels) - 1}")
    _require(m.train_timesteps >= 10, f"model.train_timesteps: {m.train_timesteps} must be >= 10")
    _require(0.0 <= m.ema_decay < 1.0, f"model.ema_decay: {m.ema_decay} must be in [0, 1)")

    _require(du.kind in DUAL_KINDS, f"dual.kind: {du.kind!r} not allowed; allowed: {', '.join(DUAL_KINDS)}")
    _require(du.eta > 0, f"dual.eta: {du.eta} must be > 0 (dual step size; stable for eta <= 1)")
    _require(du.eta_schedule in ETA_SCHEDULES,
             f"dual.eta_schedule: {du.eta_schedule!r} not allowed; allowed: {', '.join(ETA_SCHEDULES)}")
    _require(du.optimizer in DUAL_OPTIMIZERS,
             f"dual.optimizer: {du.optimizer!r} not allowed; allowed: {', '.join(DUAL_OPTIMIZERS)}")
    _require(du.kp >= 0, f"dual.kp: {du.kp} must be >= 0 (nuPI's proportional gain)")
    _require(du.ki > 0, f"dual.ki: {du.ki} must be > 0 (nuPI's integral gain)")
    _require(0 <= du.nu < 1, f"dual.nu: {du.nu} must be in [0, 1) (nuPI's EMA factor of the error)")
    _require(du.gamma >= 0, f"dual.gamma: {du.gamma} must be >= 0")
    _require(du.kind != "resilient" or du.gamma > 0, f"dual.gamma: {du.gamma} must be > 0 for dual.kind=resilient")
    _require(du.primal_steps >= 1, f"dual.primal_steps: {du.primal_steps} must be >= 1")
    _require(du.lambda_init >= 0, f"dual.lambda_init: {du.lambda_init} must be >= 0")
    _require(all(b >= 0 for b in du.b), f"dual.b: {du.b} thresholds must be >= 0 (they bound a loss)")
    n = 1 if cfg.is_finetune else len(d.minority_classes)
    _require(len(du.b) in (1, n), f"dual.b: {du.b} needs 1 value or one per constraint ({n})")

    _require(o.lr > 0, f"optim.lr: {o.lr} must be > 0")
    _require(o.warmup >= 0, f"optim.warmup: {o.warmup} must be >= 0")
    _require(o.batch_size > 0, f"optim.batch_size: {o.batch_size} must be > 0")
    _require(o.constraint_batch_size > 0, f"optim.constraint_batch_size: {o.constraint_batch_size} must be > 0")
    _require(o.steps > 0, f"optim.steps: {o.steps} must be > 0")
    _require(o.train_seed >= -1, f"optim.train_seed: {o.train_seed} must be >= 0, or -1 (optim.seed)")
    _require(o.weight_decay >= 0, f"optim.weight_decay: {o.weight_decay} must be >= 0")
    _require(o.grad_clip > 0, f"optim.grad_clip: {o.grad_clip} must be > 0")
    _require(o.threads >= 0, f"optim.threads: {o.threads} must be >= 0")
    _require(o.precision in PRECISIONS, f"optim.precision: {o.precision!r} not allowed; allowed: "
             f"{', '.join(PRECISIONS)}")

    _require(e.n_samples > 0, f"eval.n_samples: {e.n_samples} must be > 0")
    _require(e.sampler_steps >= 1, f"eval.sampler_steps: {e.sampler_steps} must be >= 1")
    _require(e.sampler_steps <= m.train_timesteps,
             f"eval.sampler_steps: {e.sampler_steps} must be <= model.train_timesteps ({m.train_timesteps})")
    _require(e.batch_size > 0, f"eval.batch_size: {e.batch_size} must be > 0")
    _require(e.fid_features in FID_FEATURES,
             f"eval.fid_features: {e.fid_features!r} not allowed; allowed: {', '.join(FID_FEATURES)}")
    _require(e.classifier_epochs >= 1, f"eval.classifier_epochs: {e.classifier_epochs} must be >= 1")
    _require(e.classifier_train_per_class >= 1,
             f"eval.classifier_train_per_class: {e.classifier_train_per_class} must be >= 1")
    _require(e.bootstrap == 0 or e.bootstrap >= 20,
             f"eval.bootstrap: {e.bootstrap} must be 0 (no intervals) or >= 20 resamples")
    _require(e.pr_k >= 1, f"eval.pr_k: {e.pr_k} must be >= 1 (nearest neighbours)")
    _require(e.class_fid_samples >= 2, f"eval.class_fid_samples: {e.class_fid_samples} must be >= 2")
    _require(not e.baseline_shares or (len(e.baseline_shares) == len(d.classes) and min(e.baseline_shares) >= 0
                                        and abs(sum(e.baseline_shares) - 1.0) < 1e-6),
             f"eval.baseline_shares: {e.baseline_shares} must be [] or {len(d.classes)} shares (one per class of "
             f"data.classes {d.classes}), each >= 0, summing to 1")

    if cfg.is_finetune:
        _validate_finetune(cfg)

    r, fa = cfg.ray, cfg.fault
    _require(r.workers >= 1, f"ray.workers: {r.workers} must be >= 1")
    _require(r.cpus_per_worker >= 0, f"ray.cpus_per_worker: {r.cpus_per_worker} must be >= 0")
    _require(r.checkpoint_every >= 1, f"ray.checkpoint_every: {r.checkpoint_every} must be >= 1 (dual steps)")
    _require(r.report_every >= 0, f"ray.report_every: {r.report_every} must be >= 0 (primal steps between "
             "reports of the window's mean losses; 0 = no such reports)")
    _require(r.keep_checkpoints >= 1, f"ray.keep_checkpoints: {r.keep_checkpoints} must be >= 1")
    _require(r.max_failures >= -1, f"ray.max_failures: {r.max_failures} must be >= -1 (-1: unlimited)")
    _require(bool(r.storage), "ray.storage: must be a path or URI")
    _require(fa.mode in FAULT_MODES, f"fault.mode: {fa.mode!r} not allowed; allowed: {', '.join(FAULT_MODES)}")
    _require(0 <= fa.rank < r.workers, f"fault.rank: {fa.rank} must be in 0..{r.workers - 1} (ray.workers)")

def check_image_size(cfg: Config, factor: int) -> None:
    """The UNet halves the image ``len(model.channels) - 1`` times, after a VAE's downsampling ``factor``."""
    d, m = cfg.data, cfg.model
    down = 2 ** (len(m.channels) - 1)
    _require(d.image_size % (down * factor) == 0,
             f"data.image_size: {d.image_size} must be divisible by {down * factor} "
             f"(2^(levels-1) for model.channels {m.channels}"
             + (f" x the VAE's downsampling {factor}" if m.vae else "")
             + f"); try {max(down * factor, d.image_size // (down * factor) * (down * factor))}")


def _validate_finetune(cfg: Config) -> None:
    f, d = cfg.finetune, cfg.data
    _require(bool(f.new_classes), "finetune.new_classes: at least one new class is needed")
    bad = [c for c in f.new_classes if c not in d.classes]
    _require(not bad, f"finetune.new_classes: {bad} not in data.classes {d.classes}")
    _require(len(set(f.new_classes)) == len(f.new_classes), f"finetune.new_classes: duplicate class ids in {f.new_classes}")
    _require(len(f.new_classes) < len(d.classes), "finetune.new_classes: at least one class must be an old class")
    _require(f.new_count > 0, f"finetune.new_count: {f.new_count} must be a positive integer")
    _require(f.anchor_inputs in ANCHOR_INPUTS,
             f"finetune.anchor_inputs: {f.anchor_inputs!r} not allowed; allowed: {', '.join(ANCHOR_INPUTS)}")
    _require(not d.minority_classes, f"data.minority_classes: {d.minority_classes} must be [] when fine-tuning "
             "(finetune.pretrained is set; its one constraint is closeness to the pre-trained model)")
