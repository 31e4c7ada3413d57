"""The primal-dual loop (paper.md section 2), written once for one process and for Ray Train workers.

Per primal step: one batch from the objective dataset and one from every constraint dataset,
**one** UNet forward over their concatenation, per-sample denoising losses, per-dataset means,
Lagrangian L0 + sum_i lambda_i L_i, one AdamW step. Every ``dual.primal_steps`` steps the mean
constraint losses of the block are averaged over ranks and one dual step updates lambda, which is
therefore identical on every rank. Host-device syncs: one boolean per primal step (the non-finite guard,
before the optimiser step), the block means at these block boundaries and, when ``ray.report_every`` > 0 and
an ``on_report`` callback is given, the window means once per report window.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from diffusers.optimization import get_cosine_schedule_with_warmup

from cdd_ray import storage
from cdd_ray.checkpoint import CheckpointError, Snapshot, load_model
from cdd_ray.config import Config, ConfigError
from cdd_ray.data import Split
from cdd_ray.dual import DualState
from cdd_ray.metrics import ASHA_LOSS
from cdd_ray.model import add_noise, autocast_for, build_ema, build_noise_scheduler, unet_for

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
class Anchor:
    """Fine-tuning's constraint target: a frozen pre-trained UNet and where its inputs x_t come from.

    The constraint is E ||eps_theta(x_t, t) - eps_pre(x_t, t)||^2; eps_theta runs inside the fused
    forward (so the constraint carries gradient to theta), eps_pre without gradient.
    """

    unet: torch.nn.Module
    n: int  # x_t per primal step
    data: torch.Tensor | None = None  # None: x_t is Gaussian noise; else these images, noised

    def inputs(self, noise_scheduler, generator: torch.Generator, shape: tuple[int, ...],
               dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        dev = generator.device
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (self.n,), generator=generator, device=dev)
        noise = torch.randn((self.n, *shape), generator=generator, device=dev, dtype=dtype)
        if self.data is None:
            return noise, t
        idx = torch.randint(0, self.data.shape[0], (self.n,), generator=generator, device=dev)
        return add_noise(noise_scheduler, self.data[idx.to(self.data.device)], noise, t), t


def fused_losses(unet: torch.nn.Module, noise_scheduler, batches: list[torch.Tensor],
                 generator: torch.Generator, anchor: Anchor | None = None,
                 monitored: list[torch.Tensor] | None = None,
                 monitor_generator: torch.Generator | None = None) -> list[torch.Tensor]:
    """Per-dataset mean denoising losses from ONE forward over the concatenated batches.

    With an ``anchor``, its inputs join the same forward and the next loss is the mean squared
    distance between this UNet's and the frozen pre-trained UNet's noise predictions on them.
    ``monitored`` batches join the same forward too and their mean denoising losses come last; their noise
    and timesteps come from ``monitor_generator``, so ``generator``'s draws (the training's noise) are the
    same as without them. The caller gives them no gradient weight (GroupNorm: per-sample, so they do not
    change the other samples' predictions either).
    """
    x0 = torch.cat(batches)
    noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (x0.shape[0],),
                      generator=generator, device=x0.device)
    inputs, ts = add_noise(noise_scheduler, x0, noise, t), t
    na = 0
    if anchor is not None:
        xa, ta = anchor.inputs(noise_scheduler, generator, tuple(x0.shape[1:]), x0.dtype)
        inputs, ts, na = torch.cat([inputs, xa]), torch.cat([t, ta]), xa.shape[0]
    if monitored:
        gm = monitor_generator if monitor_generator is not None else generator
        xm = torch.cat(monitored)
        noise_m = torch.randn(xm.shape, generator=gm, device=xm.device, dtype=xm.dtype)
        tm = torch.randint(0, noise_scheduler.config.num_train_timesteps, (xm.shape[0],), generator=gm,
                           device=xm.device)
        inputs, ts = torch.cat([inputs, add_noise(noise_scheduler, xm, noise_m, tm)]), torch.cat([ts, tm])
    pred = _full(unet(inputs, ts).sample)
    n = x0.shape[0]
    per_sample = (pred[:n] - _full(noise)).pow(2).mean(dim=(1, 2, 3))
    losses = [seg.mean() for seg in per_sample.split([b.shape[0] for b in batches])]
    if anchor is not None:
        with torch.no_grad():
            target = _full(anchor.unet(xa, ta).sample)
        losses.append((pred[n:n + na] - target).pow(2).mean())
    if monitored:
        per_m = (pred[n + na:] - _full(noise_m)).pow(2).mean(dim=(1, 2, 3))
        losses += [seg.mean() for seg in per_m.split([b.shape[0] for b in monitored])]
    return losses


def _full(x: torch.Tensor) -> torch.Tensor:
    """Losses in at least fp32 (autocast outputs are bf16/fp16; fp64 stays fp64)."""
    return x.float() if x.element_size() < 4 else x


NOISE_STREAM, MONITOR_STREAM = 997, 1999  # stream ids of the noise generators (datasets are 0, 1, ...)


def stream_seed(seed: int, rank: int, stream: int, joined_at: int = 0) -> int:
    """The seed of one random stream of one rank. ``joined_at`` > 0: the step at which this rank joined a run
    resumed with more workers than its checkpoint had, so that it never replays a stream any rank drew before
    (not even its own namesake's from before a resume with fewer workers)."""
    return seed * 1_000_003 + rank * 7919 + stream + joined_at * 1_000_000_007


class BatchSampler:
    """Uniform sampling with replacement from device-resident tensors, one generator per dataset.

    ``balanced_labels`` (the first dataset's class labels): that dataset is drawn class-balanced instead:
    each draw picks one of its classes uniformly, then an image of that class uniformly (with replacement),
    from the same generator, so it is reproducible per rank and resumable like the uniform draws.
    """

    def __init__(self, datasets: list[torch.Tensor], sizes: list[int], seed: int, rank: int,
                 balanced_labels: torch.Tensor | None = None, joined_at: int = 0):
        self.datasets, self.sizes = datasets, sizes
        self.generators = [torch.Generator().manual_seed(stream_seed(seed, rank, i, joined_at))
                           for i in range(len(datasets))]
        self.balanced = None
        if balanced_labels is not None:
            y = balanced_labels.cpu()
            if y.shape[0] != datasets[0].shape[0]:
                raise ValueError(f"balanced_labels: {y.shape[0]} labels for {datasets[0].shape[0]} images")
            _, counts = torch.unique(y, sorted=True, return_counts=True)
            # Indices grouped by class; class k's images are order[starts[k] : starts[k] + counts[k]].
            self.balanced = (torch.argsort(y, stable=True), torch.cumsum(counts, 0) - counts, counts)

    def draw(self) -> list[torch.Tensor]:
        out = []
        for i, (data, n, g) in enumerate(zip(self.datasets, self.sizes, self.generators)):
            if i == 0 and self.balanced is not None:
                idx = self._balanced_index(n, g)
            else:
                idx = torch.randint(0, data.shape[0], (n,), generator=g)
            out.append(data[idx.to(data.device, non_blocking=True)])
        return out

    def _balanced_index(self, n: int, g: torch.Generator) -> torch.Tensor:
        order, starts, counts = self.balanced
        k = torch.randint(0, counts.shape[0], (n,), generator=g)
        # Uniform within the class: a 62-bit integer modulo the class size (bias < size / 2^62).
        j = torch.randint(0, 2 ** 62, (n,), generator=g) % counts[k]
        return order[starts[k] + j]

    def state(self) -> list[torch.Tensor]:
        return [g.get_state() for g in self.generators]

    def load_state(self, states: list[torch.Tensor]) -> None:
        for g, s in zip(self.generators, states):
            g.set_state(s)


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model


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
        unet.load_state_dict(_warm_start_weights(o.init_from, cfg))
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
        return _snapshot(cfg, unet, ema, optimizer, lr_sched, scaler, sampler, noise_gen, dual, step, worker,
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


def build_anchor(cfg: Config, new_data: torch.Tensor, device: torch.device) -> Anchor:
    """The frozen pre-trained UNet (its EMA weights: the model that was sampled) and its input source."""
    pre, _, _ = load_model(cfg.finetune.pretrained, ema=True)
    _check_shape(pre, cfg, "finetune.pretrained", cfg.finetune.pretrained)
    pre.eval().requires_grad_(False)
    data = new_data if cfg.finetune.anchor_inputs == "data" else None
    return Anchor(unet=pre.to(device), n=cfg.optim.constraint_batch_size, data=data)


def _warm_start_weights(directory: str, cfg: Config) -> dict[str, torch.Tensor]:
    """UNet weights of another run's checkpoint (a local folder, or one in the run storage: a URI); the
    architecture must match this run's preset."""
    import tempfile

    if storage.is_uri(directory):
        with tempfile.TemporaryDirectory(prefix="cdd-init-from-") as tmp:
            try:
                storage.download(storage.join(directory, "unet"), Path(tmp) / "unet")  # what load_model reads
                for name in ("dual_state.json", "config.json"):
                    (Path(tmp) / name).write_text(storage.read_text(storage.join(directory, name)) or "")
            except OSError as e:
                raise ConfigError(f"optim.init_from: cannot read {directory!r}: {str(e).splitlines()[0]}") from None
            return _warm_start_weights(tmp, cfg)
    unet, _, _ = load_model(directory, ema=False)
    _check_shape(unet, cfg, "optim.init_from", directory)
    return unet.state_dict()


def _check_shape(unet: torch.nn.Module, cfg: Config, field_: str, directory: str) -> None:
    mine = unet_for(cfg).config
    def norm(v: Any) -> Any:
        return list(v) if isinstance(v, (list, tuple)) else v

    if any(norm(unet.config.get(k)) != norm(v) for k, v in mine.items() if not k.startswith("_")):
        raise CheckpointError(f"{field_}: {directory!r} holds a UNet of another shape "
                              f"(block_out_channels {unet.config.block_out_channels}, sample_size "
                              f"{unet.config.sample_size}) than model.preset={cfg.model.preset!r}")


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


def _snapshot(cfg, unet, ema, optimizer, lr_sched, scaler, sampler, noise_gen, dual, step, worker,
              history, monitor_gen=None) -> Snapshot:
    """Current state as a Snapshot (CPU copies); RNG states of every rank are gathered."""
    batches, noise = sampler.state(), noise_gen.get_state()
    monitor = monitor_gen.get_state() if monitor_gen is not None else None
    if worker.world_size > 1:
        gathered: list[Any] = [None] * worker.world_size
        dist.all_gather_object(gathered, (batches, noise, monitor))
        batches_all = [g[0] for g in gathered]
        noise_all = [g[1] for g in gathered]
        monitor_all = [g[2] for g in gathered]
    else:
        batches_all, noise_all, monitor_all = [batches], [noise], [monitor]
    rng = {"batches": batches_all, "noise": [s.cpu() for s in noise_all]}
    if monitor is not None:
        rng["monitor_noise"] = [s.cpu() for s in monitor_all]
    ema_unet = unet_for(cfg)
    ema.copy_to(ema_unet.parameters())
    unet_cpu = unet_for(cfg)
    unet_cpu.load_state_dict({k: v.detach().cpu() for k, v in unet.state_dict().items()})
    trainer_state = copy.deepcopy({  # state_dict()s hold live references to the training tensors
        "optimizer": optimizer.state_dict(),
        "lr_scheduler": lr_sched.state_dict(),
        "ema": ema.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else {},
        "rng": rng,
    })
    return Snapshot(unet=unet_cpu, ema_unet=ema_unet.cpu(), trainer_state=trainer_state,
                    dual=DualState.from_dict(dual.to_dict()), config=cfg.to_dict(),
                    meta={"step": step, "dual_step": dual.step, "history": copy.deepcopy(history)})
