"""The sampler on a model whose answer is known: the exact noise predictor of a Gaussian data distribution."""

from types import SimpleNamespace

import pytest
import torch

from cdd_ray.config import ModelConfig
from cdd_ray.evaluation.sampling import sample
from cdd_ray.model import build_noise_scheduler


class GaussianOracle(torch.nn.Module):
    """E[eps | x_t] for data x0 ~ N(0, std^2 I): sqrt(1 - abar_t) x_t / (abar_t std^2 + 1 - abar_t). A perfectly
    trained UNet on such data; DDIM with it draws samples of std about ``std``."""

    def __init__(self, alphas_cumprod: torch.Tensor, std: float, channels: int = 4, size: int = 8):
        super().__init__()
        self.abar, self.std = alphas_cumprod.float(), std
        self.config = SimpleNamespace(in_channels=channels, sample_size=size)
        self.weight = torch.nn.Parameter(torch.zeros(1))  # a parameter, as a UNet has (device look-ups)

    def forward(self, x, t):
        a = self.abar[t.long()].view(-1, 1, 1, 1) if t.dim() else self.abar[t.long()]
        return SimpleNamespace(sample=(1 - a).sqrt() * x / (a * self.std ** 2 + 1 - a))


def _draw(vae: str, std: float) -> torch.Tensor:
    sched = build_noise_scheduler(ModelConfig(vae=vae))
    return sample(GaussianOracle(sched.alphas_cumprod, std), sched, n=256, steps=50, batch_size=128, seed=0)


def test_latent_samples_are_not_clipped():
    """Unit-variance latents (as scaled VAE latents are): a third of their values lie outside [-1, 1]. The
    sampler keeps them and their std (within 10% of 1); clipping x0 at every step and the result would cap them
    at 1 and shrink the std to about 0.8."""
    z = _draw("/some/vae", 1.0)
    assert z.abs().max() > 2.0
    assert (z.abs() > 1).float().mean() > 0.25
    assert z.std().item() == pytest.approx(1.0, rel=0.10)


def test_pixel_samples_stay_in_range():
    """Pixel models keep the clipping: a data std of 1.0 would put values outside [-1, 1] without it."""
    x = _draw("", 1.0)
    assert x.abs().max() <= 1.0
    assert x.std().item() < 0.9
