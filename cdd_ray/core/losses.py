"""The primal step's losses: **one** UNet forward over the objective batch, every constraint batch and the monitored
batches, concatenated (paper.md section 2), per-sample denoising losses and per-dataset means; fine-tuning's
anchor (the frozen pre-trained UNet as the constraint's target)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cdd_ray.checkpoint import load_model
from cdd_ray.config import Config
from cdd_ray.core.state import check_shape
from cdd_ray.model import add_noise


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


def build_anchor(cfg: Config, new_data: torch.Tensor, device: torch.device) -> Anchor:
    """The frozen pre-trained UNet (its EMA weights: the model that was sampled) and its input source."""
    pre, _, _ = load_model(cfg.finetune.pretrained, ema=True)
    check_shape(pre, cfg, "finetune.pretrained", cfg.finetune.pretrained)
    pre.eval().requires_grad_(False)
    data = new_data if cfg.finetune.anchor_inputs == "data" else None
    return Anchor(unet=pre.to(device), n=cfg.optim.constraint_batch_size, data=data)
