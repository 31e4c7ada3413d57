"""UNet presets (diffusers UNet2DModel), the DDPM noise schedule and EMA weights."""

from __future__ import annotations

import contextlib

import torch
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel
from diffusers.training_utils import EMAModel

from cdd_ray.config import Config, ModelConfig


def build_unet(cfg: ModelConfig, image_size: int, channels: int = 1) -> UNet2DModel:
    """A ``channels``-channel UNet with ``len(cfg.channels)`` levels; attention at ``cfg.attention_levels``."""
    n = len(cfg.channels)
    attn = set(cfg.attention_levels)
    down = tuple("AttnDownBlock2D" if i in attn else "DownBlock2D" for i in range(n))
    up = tuple("AttnUpBlock2D" if (n - 1 - i) in attn else "UpBlock2D" for i in range(n))
    return UNet2DModel(
        sample_size=image_size,
        in_channels=channels,
        out_channels=channels,
        layers_per_block=cfg.layers_per_block,
        block_out_channels=tuple(cfg.channels),
        down_block_types=down,
        up_block_types=up,
        norm_num_groups=cfg.norm_groups,
    )


def unet_for(cfg: Config) -> UNet2DModel:
    """The run's UNet: on pixels, or on the VAE's latents (``model.vae``)."""
    channels, size = cfg.unet_shape()
    return build_unet(cfg.model, size, channels)


def build_noise_scheduler(cfg: ModelConfig) -> DDPMScheduler:
    """The DDPM schedule. Pixels live in [-1, 1], so their samplers clip the predicted x0 there; a latent model's
    (``cfg.vae``) scaled VAE latents are about unit-variance, with a large share of values outside [-1, 1], so
    nothing clips them."""
    return DDPMScheduler(num_train_timesteps=cfg.train_timesteps, beta_schedule="linear",
                         prediction_type="epsilon", clip_sample=not cfg.vae)


def build_sampler(noise_scheduler: DDPMScheduler) -> DDIMScheduler:
    return DDIMScheduler.from_config(noise_scheduler.config)


def build_ema(unet: UNet2DModel, decay: float) -> EMAModel:
    return EMAModel(unet.parameters(), decay=decay, use_ema_warmup=True, model_cls=UNet2DModel,
                    model_config=unet.config)


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def add_noise(noise_scheduler: DDPMScheduler, x0: torch.Tensor, noise: torch.Tensor,
              t: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, computed on x0's device and dtype."""
    abar = noise_scheduler.alphas_cumprod.to(device=x0.device, dtype=torch.float32)[t]
    abar = abar.view(-1, 1, 1, 1)
    return (abar.sqrt() * x0 + (1 - abar).sqrt() * noise).to(x0.dtype)


def autocast_for(device: torch.device, precision: str = "auto"
                 ) -> tuple[contextlib.AbstractContextManager, torch.amp.GradScaler | None]:
    """``optim.precision``: auto = bf16 autocast on GPUs that support it, fp16 + grad scaler on older GPUs, fp32
    on CPU; fp32 = no autocast; bf16 = bf16 autocast on any device (CPU included, no scaler needed); fp16 = fp16
    autocast + grad scaler on any device (the authors' setting)."""
    if precision == "fp32":
        return contextlib.nullcontext(), None
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16), None
    if precision == "fp16":
        return torch.autocast(device.type, dtype=torch.float16), torch.amp.GradScaler(device.type)
    if device.type != "cuda":
        return contextlib.nullcontext(), None
    if torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16), None
    return torch.autocast("cuda", dtype=torch.float16), torch.amp.GradScaler("cuda")


# ---------------------------------------------------------------- latent diffusion


def load_vae(path: str, device: torch.device | str = "cpu"):
    """A local diffusers AutoencoderKL (e.g. sd-vae-ft-mse), frozen, in eval mode."""
    from diffusers import AutoencoderKL

    from cdd_ray.checkpoint import from_pretrained  # checkpoint builds models from this module: a cycle at the top

    vae = from_pretrained(AutoencoderKL, path).to(device).eval()
    vae.requires_grad_(False)
    return vae


@torch.no_grad()
def encode(vae, x: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Pixels in [-1, 1] -> latents: the posterior mean x the VAE's scaling factor (deterministic)."""
    dev = next(vae.parameters()).device
    s = vae.config.scaling_factor
    return torch.cat([vae.encode(x[i:i + batch_size].to(dev)).latent_dist.mean.float().cpu() * s
                      for i in range(0, x.shape[0], batch_size)])


@torch.no_grad()
def decode(vae, z: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Latents -> pixels in [-1, 1]."""
    dev = next(vae.parameters()).device
    s = vae.config.scaling_factor
    return torch.cat([vae.decode(z[i:i + batch_size].to(dev) / s).sample.float().clamp(-1, 1).cpu()
                      for i in range(0, z.shape[0], batch_size)])
