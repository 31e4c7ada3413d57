"""The primal-dual loop (paper.md section 2), written once for one process and for Ray Train workers.

Per primal step: one batch from the objective dataset and one from every constraint dataset,
**one** UNet forward over their concatenation, per-sample denoising losses, per-dataset means,
Lagrangian L0 + sum_i lambda_i L_i, one AdamW step. Every ``dual.primal_steps`` steps the mean
constraint losses of the block are averaged over ranks and one dual step updates lambda, which is
therefore identical on every rank. Host-device syncs: one boolean per primal step (the non-finite guard,
before the optimiser step), the block means at these block boundaries and, when ``ray.report_every`` > 0 and
an ``on_report`` callback is given, the window means once per report window."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.distributed as dist
from diffusers.optimization import get_cosine_schedule_with_warmup

from cdd_ray.checkpoint import Snapshot
from cdd_ray.config import Config
from cdd_ray.core.batches import MONITOR_STREAM, NOISE_STREAM, BatchSampler, stream_seed
from cdd_ray.core.dual import DualState
from cdd_ray.core.losses import build_anchor, fused_losses
from cdd_ray.core.state import snapshot_of, warm_start_weights
from cdd_ray.data import Split
from cdd_ray.metrics import ASHA_LOSS
from cdd_ray.model import autocast_for, build_ema, build_noise_scheduler, unet_for

log = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    """A loss became NaN or Inf; the run stops before lambda or the weights are updated from it."""


@dataclass
class Worker:
    """Where this copy of the loop runs: rank, world size, device."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def all_reduce_mean(self, t: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
            t = t / self.world_size
        return t


@dataclass
class LoopResult:
    unet: torch.nn.Module  # training weights (unwrapped)
    ema_unet: torch.nn.Module  # EMA weights, for sampling
    dual: DualState
    history: list[dict[str, float]]
    step: int
    train_s: float
    start_step: int = 0  # > 0 when the run continued from a checkpoint


BlockCallback = Callable[[dict[str, float], Callable[[], Snapshot]], None]

# Called every ``ray.report_every`` primal steps (never at the final step) with the window's mean losses.
ReportCallback = Callable[[dict[str, float]], None]


@dataclass
class Hooks:
    """How a caller sees into and steers the loop, every one optional: the loop itself knows nothing of Ray,
    MLflow or progress bars.

    ``prepare_model`` wraps the UNet for data parallelism (Ray's ``prepare_model``). ``before_step(step)`` runs
    before every primal step (the fault test hook). ``on_block(metrics, snapshot)`` runs after every block of
    ``dual.primal_steps`` steps, after its dual step; ``snapshot()`` builds a checkpoint of the current state on
    demand (a collective: every rank calls it). ``on_report(metrics)`` (with ``ray.report_every`` > 0) runs when
    the primal step count is a multiple of ``ray.report_every``, whatever the block boundaries, except at the final
    step: the losses' means over the steps since the previous report, all-reduced over ranks (``_window_metrics``),
    after that step's optimizer step and dual step (and ``on_block``), so everything up to the report step is done
    and recorded when it is sent; a non-finite window mean raises ``NonFiniteLossError`` there."""
    prepare_model: Callable[[torch.nn.Module], torch.nn.Module] | None = None
    before_step: Callable[[int], None] | None = None
    on_block: BlockCallback | None = None
    on_report: ReportCallback | None = None


@dataclass
class Run:
    """One copy of the loop, set up (``setup``): what every step reads and changes."""

    cfg: Config
    worker: Worker
    hooks: Hooks
    names: list[str]  # the constraints: losses weighted by lambda in the Lagrangian
    monitored: list[str]  # losses only recorded (after the constraints in every loss vector)
    n_train: int  # the sampler's datasets that carry gradient; the monitored ones follow
    unet: torch.nn.Module  # the training weights
    model: torch.nn.Module  # what the forward runs: the UNet, prepared for data parallelism, compiled
    ema: Any
    anchor: Any  # fine-tuning's frozen pre-trained UNet, else None
    noise_scheduler: Any
    optimizer: torch.optim.Optimizer
    lr_sched: Any
    amp: Any
    scaler: torch.amp.GradScaler | None
    sampler: BatchSampler
    noise_gen: torch.Generator
    monitor_gen: torch.Generator | None
    dual: DualState
    lam: torch.Tensor  # dual.lam on the device
    step: int
    history: list[dict[str, float]]

    @property
    def recorded(self) -> list[str]:
        """The datasets of every loss vector after the objective: the constraints, then the monitored ones."""
        return self.names + self.monitored

    def snapshot(self) -> Snapshot:
        return snapshot_of(self.cfg, self.unet, self.ema, self.optimizer, self.lr_sched, self.scaler, self.sampler,
                           self.noise_gen, self.dual, self.step, self.worker, self.history, self.monitor_gen)


@dataclass
class Sums:
    """Per-dataset losses summed over steps: since the last dual step (the block) or the last report (the window)."""

    total: torch.Tensor
    n: int = 0

    def add(self, losses: torch.Tensor) -> None:
        self.total += losses
        self.n += 1

    def means(self, worker: Worker) -> list[float]:
        """The means over the steps summed, all-reduced over ranks (a host-device sync)."""
        return worker.all_reduce_mean(self.total / self.n).tolist()

    def reset(self) -> None:
        self.total.zero_()
        self.n = 0


def train(cfg: Config, split: Split, worker: Worker | None = None, resume: Snapshot | None = None,
          hooks: Hooks | None = None) -> LoopResult:
    """Run the primal-dual loop for ``cfg.optim.steps`` primal steps (continuing ``resume`` if given), as rank
    ``worker`` of its workers (one process by default), calling out through ``hooks``."""
    run = setup(cfg, split, worker or Worker(), resume, hooks or Hooks())
    steps, every = cfg.optim.steps, cfg.ray.report_every if run.hooks.on_report is not None else 0
    block = Sums(torch.zeros(1 + len(run.names) + len(run.monitored), device=run.worker.device))
    window = Sums(torch.zeros_like(block.total)) if every else None
    start_step, t0 = run.step, time.perf_counter()
    run.model.train()
    while run.step < steps:
        losses = primal_step(run)
        block.add(losses)
        if window is not None:
            window.add(losses)
        if run.step % cfg.dual.primal_steps == 0 or run.step == steps:
            dual_step(run, block)
        else:
            apply_step(run)
        # A report window ends here (the final step has its own report): it is sent after this step's dual step,
        # so whoever acts on it (ASHA may stop the trial) has every dual step up to it.
        if window is not None and run.step % every == 0 and run.step < steps:
            send_window(run, window)
    ema_unet = unet_for(cfg).to(run.worker.device)
    run.ema.copy_to(ema_unet.parameters())
    return LoopResult(unet=run.unet, ema_unet=ema_unet, dual=run.dual, history=run.history, step=run.step,
                      train_s=time.perf_counter() - t0, start_step=start_step)


def setup(cfg: Config, split: Split, worker: Worker, resume: Snapshot | None, hooks: Hooks) -> Run:
    """The model, its optimiser, the random streams and the multipliers: new, or as ``resume`` left them."""
    dev, o, names = worker.device, cfg.optim, cfg.constraint_names()
    # Monitored losses: recorded per block, no gradient weight. Fine-tuning always measures the distance to
    # the pre-trained model (unconstrained: only as a metric); optim.monitor_constraints draws the constraint
    # datasets of an unconstrained run into the fused forward to record their losses.
    monitor_sets = (list(split.constraints) if o.monitor_constraints and cfg.unconstrained and not cfg.is_finetune
                    else [])
    monitored = (["pretrained"] if cfg.is_finetune and cfg.unconstrained else []) + monitor_sets
    unet, anchor = initial_weights(cfg, split, dev, resume)
    unet.to(dev)
    if o.channels_last:
        unet.to(memory_format=torch.channels_last)
    ema = build_ema(unet, cfg.model.ema_decay)
    noise_scheduler = build_noise_scheduler(cfg.model)
    model = hooks.prepare_model(unet) if hooks.prepare_model else unet
    if o.compile:
        model = torch.compile(model)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=o.lr, weight_decay=o.weight_decay)
    lr_sched = get_cosine_schedule_with_warmup(optimizer, o.warmup, o.steps)
    amp, scaler = autocast_for(dev, o.precision)
    constraint_sets = [] if cfg.is_finetune else names
    datasets = [split.objective.to(dev)] + [split.constraints[n].to(dev) for n in constraint_sets + monitor_sets]
    sizes = [o.batch_size] + [o.constraint_batch_size] * (len(constraint_sets) + len(monitor_sets))
    du = cfg.dual
    dual = DualState.create(names, cfg.thresholds(), du.kind, du.eta, du.gamma, du.lambda_init, du.optimizer,
                            du.kp, du.ki, du.nu)
    step = int(resume.meta["step"]) if resume is not None else 0
    rng = resume.trainer_state["rng"] if resume is not None else None
    # A rank the checkpoint has no streams for (resumed with more workers) starts new ones of its own.
    joined_at = max(step, 1) if rng is not None and worker.rank >= len(rng["batches"]) else 0
    if joined_at:
        log.warning("rank %d: the checkpoint holds the random streams of %d rank(s); this rank starts new streams "
                    "(seeded from the step it joined at, %d)", worker.rank, len(rng["batches"]), step)
    sampler = BatchSampler(datasets, sizes, o.draws_seed, worker.rank,
                           balanced_labels=split.objective_labels if o.balanced else None, joined_at=joined_at)
    noise_gen = torch.Generator(device=dev).manual_seed(stream_seed(o.draws_seed, worker.rank, NOISE_STREAM, joined_at))
    # The monitored batches' noise and timesteps: their own stream, so the training's draws are unchanged.
    monitor_gen = (torch.Generator(device=dev).manual_seed(stream_seed(o.draws_seed, worker.rank, MONITOR_STREAM,
                                                                       joined_at)) if monitor_sets else None)
    run = Run(cfg=cfg, worker=worker, hooks=hooks, names=names, monitored=monitored,
              n_train=1 + len(constraint_sets), unet=unet, model=model, ema=ema, anchor=anchor,
              noise_scheduler=noise_scheduler, optimizer=optimizer, lr_sched=lr_sched, amp=amp, scaler=scaler,
              sampler=sampler, noise_gen=noise_gen, monitor_gen=monitor_gen, dual=dual, lam=torch.empty(0),
              step=step, history=[])
    if resume is not None:
        restore(run, resume, own_streams=not joined_at)
    run.lam = torch.tensor(run.dual.lam, device=dev)
    return run


def initial_weights(cfg: Config, split: Split, dev: torch.device, resume: Snapshot | None
                    ) -> tuple[torch.nn.Module, Any]:
    """The UNet a run starts from (the checkpoint's, a warm start's, fine-tuning's pre-trained one or a seeded
    initialisation, identical on every rank) and fine-tuning's frozen anchor (else None)."""
    torch.manual_seed(cfg.optim.draws_seed)  # identical initial weights on every rank
    unet = unet_for(cfg)
    if resume is not None:
        unet.load_state_dict(resume.unet.state_dict())
    elif cfg.optim.init_from:
        unet.load_state_dict(warm_start_weights(cfg.optim.init_from, cfg))
    # Fine-tuning: the frozen pre-trained UNet is the constraint's target and, on a fresh start, theta's init.
    anchor = build_anchor(cfg, split.objective.to(dev), dev) if cfg.is_finetune else None
    if anchor is not None and resume is None and not cfg.optim.init_from:
        unet.load_state_dict(anchor.unet.state_dict())
    return unet, anchor


def restore(run: Run, resume: Snapshot, own_streams: bool) -> None:
    """The optimiser, schedule, EMA, scaler, multipliers and history of a checkpoint; this rank's random streams
    too unless the checkpoint has none for it (``own_streams`` False: it keeps the new ones it started)."""
    ts, dev = resume.trainer_state, run.worker.device
    run.optimizer.load_state_dict(ts["optimizer"])
    run.lr_sched.load_state_dict(ts["lr_scheduler"])
    run.ema.load_state_dict(ts["ema"])
    run.ema.to(dev)
    if own_streams:
        rank, rng = run.worker.rank, ts["rng"]
        run.sampler.load_state(rng["batches"][rank])
        run.noise_gen.set_state(rng["noise"][rank])
        if run.monitor_gen is not None and rng.get("monitor_noise"):
            run.monitor_gen.set_state(rng["monitor_noise"][rank])
    if run.scaler is not None and ts.get("scaler"):
        run.scaler.load_state_dict(ts["scaler"])
    run.dual = DualState.from_dict(resume.dual.to_dict())
    run.history = list(resume.meta.get("history", []))


def primal_step(run: Run) -> torch.Tensor:
    """One fused forward over a batch of every dataset, the Lagrangian's backward and the finiteness guard; the
    optimiser step is applied by ``apply_step`` / ``dual_step``. Returns the step's per-dataset losses."""
    if run.hooks.before_step is not None:
        run.hooks.before_step(run.step)
    drawn = run.sampler.draw()
    with run.amp:
        losses = fused_losses(run.model, run.noise_scheduler, drawn[:run.n_train], run.noise_gen, run.anchor,
                              monitored=drawn[run.n_train:] or None, monitor_generator=run.monitor_gen)
    stacked = torch.stack(losses)
    lagrangian = stacked[0] + (run.lam * stacked[1:1 + len(run.names)]).sum()
    run.optimizer.zero_grad(set_to_none=True)
    if run.scaler is not None:
        run.scaler.scale(lagrangian).backward()
        run.scaler.unscale_(run.optimizer)
    else:
        lagrangian.backward()
    norm = torch.nn.utils.clip_grad_norm_(run.unet.parameters(), run.cfg.optim.grad_clip)
    # The guard, every primal step before the optimiser applies it: one boolean to the host. DDP has averaged
    # the gradients, so a non-finite loss on any rank makes every rank's gradient non-finite and all ranks stop
    # at the same step. (With fp16's grad scaler an overflowing gradient is normal: the scaler skips it.)
    _check_step(run.step + 1, stacked.detach(), norm if run.scaler is None else None, run.recorded)
    run.step += 1
    return stacked.detach()


def apply_step(run: Run) -> None:
    """The optimiser applies the primal step; the schedule and the EMA follow."""
    if run.scaler is not None:
        run.scaler.step(run.optimizer)
        run.scaler.update()
    else:
        run.optimizer.step()
    run.lr_sched.step()
    run.ema.step(run.unet.parameters())


def dual_step(run: Run, block: Sums) -> None:
    """The end of a block of ``dual.primal_steps`` primal steps: its means come to the host (all-reduced over
    ranks), its last primal step is applied, lambda takes one dual step, the block's metrics go to the history and
    ``on_block``."""
    means = block.means(run.worker)
    _check_finite(run.step, means, run.recorded)
    lr_used = run.lr_sched.get_last_lr()[0]  # the learning rate of the block's last primal step
    apply_step(run)
    eta = dual_eta(run.cfg, lr_used)
    if run.names:
        run.dual.update(means[1:1 + len(run.names)], eta)
        run.lam = torch.tensor(run.dual.lam, device=run.worker.device)
    metrics = _block_metrics(run.step, run.dual, run.names, means, run.lr_sched.get_last_lr()[0], eta,
                             run.monitored)
    run.history.append(metrics)
    block.reset()
    if run.hooks.on_block is not None:
        run.hooks.on_block(metrics, run.snapshot)


def send_window(run: Run, window: Sums) -> None:
    """The report window's mean losses to ``on_report``; the window starts again. Its only sync. After a resume
    the first window starts at the checkpoint's step (window_steps says how many steps it averages); reports stay
    at multiples of report_every."""
    means = window.means(run.worker)
    _check_finite(run.step, means, run.recorded)
    run.hooks.on_report(_window_metrics(run.step, run.recorded, means, window.n))
    window.reset()


def _check_step(step: int, losses: torch.Tensor, grad_norm: torch.Tensor | None, names: list[str]) -> None:
    """Primal step ``step`` (1-based) is applied only when its losses and gradient are finite."""
    checked = losses if grad_norm is None else torch.cat([losses, grad_norm.detach().reshape(1).to(losses)])
    if bool(torch.isfinite(checked).all()):
        return
    values = losses.tolist()
    what = "loss" if not all(math.isfinite(v) for v in values) else "gradient (another rank's loss or an overflow)"
    raise NonFiniteLossError(
        f"non-finite {what} at step {step}: objective {values[0]}, constraints {dict(zip(names, values[1:]))}, "
        f"gradient norm {float(grad_norm) if grad_norm is not None else 'unchecked'}; the optimiser did not apply "
        "this step and lambda was not updated from it"
    )


def _check_finite(step: int, means: list[float], names: list[str]) -> None:
    if not all(math.isfinite(v) for v in means):
        raise NonFiniteLossError(
            f"non-finite loss at step {step}: objective {means[0]}, constraints "
            f"{dict(zip(names, means[1:]))}; lambda and weights were not updated from it"
        )


def _window_metrics(step: int, names: list[str], means: list[float], n: int) -> dict[str, float]:
    """A report window's metrics: ASHA's ``asha_loss`` and the window's mean loss per dataset.

    ``names``: the constraint then monitored datasets, in ``means[1:]``'s order.
    """
    m: dict[str, float] = {"step": step, ASHA_LOSS: sum(means) / len(means), "window_steps": n,
                           "window_loss_objective": means[0]}
    for i, name in enumerate(names):
        m[f"window_loss_{name}"] = means[1 + i]
    return m


def dual_eta(cfg: Config, lr: float) -> float:
    """The dual step size of a dual step whose block ended with primal learning rate ``lr``."""
    if cfg.dual.eta_schedule == "follow_lr":
        return cfg.dual.eta * lr / cfg.optim.lr
    return cfg.dual.eta


def _block_metrics(step: int, dual: DualState, names: list[str], means: list[float], lr: float, eta: float,
                   monitored: list[str] = ()) -> dict[str, float]:
    m: dict[str, float] = {"step": step, "dual_step": dual.step, "loss_objective": means[0], "lr": lr,
                           "loss_mean": sum(means) / len(means)}  # every dataset weighted alike: ASHA's signal
    if names:
        m["dual_eta"] = eta  # the step size this dual step used
    for i, n in enumerate(names):
        m[f"loss_{n}"] = means[1 + i]
        m[f"slack_{n}"] = means[1 + i] - dual.b[i]
        m[f"lambda_{n}"] = dual.lam[i]
    for i, n in enumerate(monitored):
        m[f"loss_{n}"] = means[1 + len(names) + i]
    return m
