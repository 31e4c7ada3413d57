"""Sampling a trained UNet, and denoising losses / distances between models on fixed noise."""

from __future__ import annotations

import torch
import torch.nn as nn
from diffusers import DDPMScheduler

from cdd_ray.model import add_noise, autocast_for, build_sampler


@torch.no_grad()
def sample(unet: nn.Module, noise_scheduler, n: int, steps: int, batch_size: int, seed: int,
           device: torch.device | str = "cpu", kind: str = "ddim") -> torch.Tensor:
    """``n`` samples, shape (n, C, S, S); deterministic for a seed. Clipped to [-1, 1] (each step's predicted x0
    and the result) when the schedule clips (``clip_sample``: pixel models); latents are left as they come.

    ``kind``: ``ddim`` (deterministic, ``steps`` steps) or ``ddpm`` (ancestral, the schedule's own steps).
    The UNet runs under the training autocast (bf16 on GPUs that support it); the update in fp32.
    """
    unet.eval()
    if kind == "ddim":
        sampler = build_sampler(noise_scheduler)
        sampler.set_timesteps(steps)
    elif kind == "ddpm":
        sampler = DDPMScheduler.from_config(noise_scheduler.config)
        sampler.set_timesteps(noise_scheduler.config.num_train_timesteps)
    else:
        raise ValueError(f"kind: {kind!r} not allowed; allowed: ddim, ddpm")
    amp = autocast_for(torch.device(device))[0]
    cfg = unet.config
    clip = bool(noise_scheduler.config.clip_sample)
    g = torch.Generator(device=device).manual_seed(seed)
    out = []
    for start in range(0, n, batch_size):
        m = min(batch_size, n - start)
        x = torch.randn((m, cfg.in_channels, cfg.sample_size, cfg.sample_size), generator=g, device=device)
        for t in sampler.timesteps:
            with amp:
                eps = unet(x, t.to(device)).sample.float()
            x = sampler.step(eps, t, x, generator=g).prev_sample if kind == "ddpm" else sampler.step(eps, t, x).prev_sample
        out.append((x.clamp(-1, 1) if clip else x).cpu())
    return torch.cat(out)


@torch.no_grad()
def batch_losses(unet: nn.Module, noise_scheduler, x: torch.Tensor, noise: torch.Tensor, t: torch.Tensor
                 ) -> torch.Tensor:
    """Per image of the batch ``x`` (on the CPU): the denoising loss of ``unet`` with that ``noise`` at timesteps
    ``t``, the mean over pixels of (predicted noise - noise)^2."""
    dev = next(unet.parameters()).device
    pred = unet(add_noise(noise_scheduler, x, noise, t).to(dev), t.to(dev)).sample.float().cpu()
    return (pred - noise).pow(2).mean(dim=(1, 2, 3))


def denoising_loss(unet: nn.Module, noise_scheduler, x0: torch.Tensor, seed: int, repeats: int = 4,
                   batch_size: int = 512) -> float:
    """Mean denoising loss of ``unet`` on images ``x0`` (fixed noise and timesteps for a seed)."""
    unet.eval()
    g = torch.Generator().manual_seed(seed)
    total, n = 0.0, 0
    for _ in range(repeats):
        for i in range(0, x0.shape[0], batch_size):
            x = x0[i:i + batch_size]
            noise = torch.randn(x.shape, generator=g)
            t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (x.shape[0],), generator=g)
            total += batch_losses(unet, noise_scheduler, x, noise, t).sum().item()
            n += x.shape[0]
    return total / n


@torch.no_grad()
def distance_to(unet: nn.Module, other: nn.Module, noise_scheduler, shape, seed: int, n: int = 512,
                batch_size: int = 256) -> float:
    """E ||eps_unet(x_t, t) - eps_other(x_t, t)||^2 over Gaussian x_t and uniform t (fixed by ``seed``)."""
    unet.eval()
    other.eval()
    dev = next(unet.parameters()).device
    g = torch.Generator().manual_seed(seed)
    total = 0.0
    for i in range(0, n, batch_size):
        m = min(batch_size, n - i)
        x = torch.randn((m, *shape), generator=g)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (m,), generator=g)
        a = unet(x.to(dev), t.to(dev)).sample.float()
        b = other(x.to(dev), t.to(dev)).sample.float()
        total += (a - b).pow(2).mean(dim=(1, 2, 3)).sum().item()
    return total / n
