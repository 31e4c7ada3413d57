"""UNet presets (diffusers UNet2DModel), the DDPM noise schedule and EMA weights."""

from __future__ import annotations

import contextlib

import torch
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel
from diffusers.training_utils import EMAModel

from cdd_ray.config import ModelConfig


def build_unet(cfg: ModelConfig, image_size: int) -> UNet2DModel:
    """A 1-channel UNet with ``len(cfg.channels)`` levels; attention at ``cfg.attention_levels``."""
    n = len(cfg.channels)
    attn = set(cfg.attention_levels)
    down = tuple("AttnDownBlock2D" if i in attn else "DownBlock2D" for i in range(n))
    up = tuple("AttnUpBlock2D" if (n - 1 - i) in attn else "UpBlock2D" for i in range(n))
    return UNet2DModel(
        sample_size=image_size,
        in_channels=1,
        out_channels=1,
        layers_per_block=cfg.layers_per_block,
        block_out_channels=tuple(cfg.channels),
        down_block_types=down,
        up_block_types=up,
        norm_num_groups=cfg.norm_groups,
    )


def build_noise_scheduler(cfg: ModelConfig) -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=cfg.train_timesteps, beta_schedule="linear",
                         prediction_type="epsilon", clip_sample=True)


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


def autocast_for(device: torch.device) -> tuple[contextlib.AbstractContextManager, torch.amp.GradScaler | None]:
    """bf16 autocast on GPUs that support it, fp16 + grad scaler on older GPUs, fp32 on CPU."""
    if device.type != "cuda":
        return contextlib.nullcontext(), None
    if torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16), None
    return torch.autocast("cuda", dtype=torch.float16), torch.amp.GradScaler("cuda")
