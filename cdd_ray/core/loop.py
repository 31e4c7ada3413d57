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
from typing import Callable

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


def train(cfg: Config, split: Split, worker: Worker | None = None, resume: Snapshot | None = None,
          hooks: Hooks | None = None) -> LoopResult:
    """Run the primal-dual loop for ``cfg.optim.steps`` primal steps (continuing ``resume`` if given), as rank
    ``worker`` of its workers (one process by default), calling out through ``hooks``."""
    worker = worker or Worker()
    hooks = hooks or Hooks()
    dev = worker.device
    o, names = cfg.optim, cfg.constraint_names()
    # Monitored losses: recorded per block, no gradient weight. Fine-tuning always measures the distance to
    # the pre-trained model (unconstrained: only as a metric); optim.monitor_constraints draws the constraint
    # datasets of an unconstrained run into the fused forward to record their losses.
    monitor_sets = (list(split.constraints) if o.monitor_constraints and cfg.unconstrained and not cfg.is_finetune
                    else [])
    monitored = (["pretrained"] if cfg.is_finetune and cfg.unconstrained else []) + monitor_sets
    torch.manual_seed(o.seed)  # identical initial weights on every rank
    unet = unet_for(cfg)
    if resume is not None:
        unet.load_state_dict(resume.unet.state_dict())
    elif o.init_from:
        unet.load_state_dict(warm_start_weights(o.init_from, cfg))
    # Fine-tuning: the frozen pre-trained UNet is the constraint's target and, on a fresh start, theta's init.
    anchor = build_anchor(cfg, split.objective.to(dev), dev) if cfg.is_finetune else None
    if anchor is not None and resume is None and not o.init_from:
        unet.load_state_dict(anchor.unet.state_dict())
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
    n_train = 1 + len(constraint_sets)  # the sampler's datasets that carry gradient; monitor_sets follow
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
    sampler = BatchSampler(datasets, sizes, o.seed, worker.rank,
                           balanced_labels=split.objective_labels if o.balanced else None, joined_at=joined_at)
    noise_gen = torch.Generator(device=dev).manual_seed(stream_seed(o.seed, worker.rank, NOISE_STREAM, joined_at))
    # The monitored batches' noise and timesteps: their own stream, so the training's draws are unchanged.
    monitor_gen = (torch.Generator(device=dev).manual_seed(stream_seed(o.seed, worker.rank, MONITOR_STREAM,
                                                                       joined_at)) if monitor_sets else None)
    if resume is not None:
        ts = resume.trainer_state
        optimizer.load_state_dict(ts["optimizer"])
        lr_sched.load_state_dict(ts["lr_scheduler"])
        ema.load_state_dict(ts["ema"])
        ema.to(dev)
        if not joined_at:
            sampler.load_state(rng["batches"][worker.rank])
            noise_gen.set_state(rng["noise"][worker.rank])
            if monitor_gen is not None and rng.get("monitor_noise"):
                monitor_gen.set_state(rng["monitor_noise"][worker.rank])
        if scaler is not None and ts.get("scaler"):
            scaler.load_state_dict(ts["scaler"])
        dual = DualState.from_dict(resume.dual.to_dict())

    history: list[dict[str, float]] = list(resume.meta.get("history", [])) if resume is not None else []

    def snapshot() -> Snapshot:
        return snapshot_of(cfg, unet, ema, optimizer, lr_sched, scaler, sampler, noise_gen, dual, step, worker,
                         history, monitor_gen)

    lam = torch.tensor(dual.lam, device=dev)
    block = torch.zeros(1 + len(names) + len(monitored), device=dev)
    block_n = 0
    report_every = cfg.ray.report_every if hooks.on_report is not None else 0
    window = torch.zeros_like(block) if report_every else None  # the losses since the last report
    window_n = 0
    start_step = step
    t0 = time.perf_counter()
    model.train()
    while step < o.steps:
        if hooks.before_step is not None:
            hooks.before_step(step)
        drawn = sampler.draw()
        with amp:
            losses = fused_losses(model, noise_scheduler, drawn[:n_train], noise_gen, anchor,
                                  monitored=drawn[n_train:] or None, monitor_generator=monitor_gen)
        stacked = torch.stack(losses)
        lagrangian = stacked[0] + (lam * stacked[1:1 + len(names)]).sum()
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(lagrangian).backward()
            scaler.unscale_(optimizer)
        else:
            lagrangian.backward()
        norm = torch.nn.utils.clip_grad_norm_(unet.parameters(), o.grad_clip)
        # The guard, every primal step before the optimiser applies it: one boolean to the host. DDP has averaged
        # the gradients, so a non-finite loss on any rank makes every rank's gradient non-finite and all ranks stop
        # at the same step. (With fp16's grad scaler an overflowing gradient is normal: the scaler skips it.)
        _check_step(step + 1, stacked.detach(), norm if scaler is None else None, names + monitored)
        block += stacked.detach()
        block_n += 1
        step += 1
        if window is not None:
            window += stacked.detach()
            window_n += 1
        # A report window ends here (the final step has its own report): it is sent after this step's dual step,
        # so whoever acts on it (ASHA may stop the trial) has every dual step up to it.
        window_ends = window is not None and step % report_every == 0 and step < o.steps
        if step % cfg.dual.primal_steps and step < o.steps:
            _optimizer_step(optimizer, scaler)
            lr_sched.step()
            ema.step(unet.parameters())
            if window_ends:
                _send_window(step, window, window_n, worker, names + monitored, hooks.on_report)
                window_n = 0
            continue
        # Block boundary: the block means come to the host (all-reduced over ranks).
        means = worker.all_reduce_mean(block / block_n).tolist()
        _check_finite(step, means, names + monitored)
        lr_used = lr_sched.get_last_lr()[0]  # the learning rate of the block's last primal step
        _optimizer_step(optimizer, scaler)
        lr_sched.step()
        ema.step(unet.parameters())
        eta = dual_eta(cfg, lr_used)
        if names:
            dual.update(means[1:1 + len(names)], eta)
            lam = torch.tensor(dual.lam, device=dev)
        metrics = _block_metrics(step, dual, names, means, lr_sched.get_last_lr()[0], eta, monitored)
        history.append(metrics)
        block.zero_()
        block_n = 0
        if hooks.on_block is not None:
            hooks.on_block(metrics, snapshot)
        if window_ends:
            _send_window(step, window, window_n, worker, names + monitored, hooks.on_report)
            window_n = 0
    ema_unet = unet_for(cfg).to(dev)
    ema.copy_to(ema_unet.parameters())
    return LoopResult(unet=unet, ema_unet=ema_unet, dual=dual, history=history, step=step,
                      train_s=time.perf_counter() - t0, start_step=start_step)


def _optimizer_step(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None) -> None:
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()


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


def _send_window(step: int, window: torch.Tensor, n: int, worker: Worker, names: list[str],
                 on_report: ReportCallback) -> None:
    """The report window's mean losses to ``on_report``; the window starts again. Its only sync. After a resume
    the first window starts at the checkpoint's step (window_steps says how many steps it averages); reports stay
    at multiples of report_every."""
    means = worker.all_reduce_mean(window / n).tolist()
    _check_finite(step, means, names)
    on_report(_window_metrics(step, names, means, n))
    window.zero_()


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
