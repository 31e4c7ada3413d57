"""The paper's other minority tasks (paper.md section 4) as config defaults over the presets.

- ``celeba``: Celeb-A in torchvision's layout, class = the sensitive attribute (default ``Male``: class 1,
  the minority, one constraint), 64x64 RGB pixels.
- ``imagenet``: an ImageFolder root of 10 classes (Imagenette), minorities cassette player, French horn
  and golf ball (by folder name), latent diffusion through a local AutoencoderKL (``model.vae``).

Sizes follow the preset: ``smoke`` keeps the tiny test sizes, the others use the task's own (ImageNet's
``paper``: the authors' 256 px images, whose 32x32 latents the 6-level UNet can halve five times).
"""

from __future__ import annotations

from typing import Any

from cdd_ray.config import Config, ConfigError, build_config

IMAGENETTE_MINORITIES = ["n02979186", "n03394916", "n03445777"]  # cassette player, French horn, golf ball

TASKS: dict[str, dict[str, Any]] = {
    "celeba": {
        "data.dataset": "celeba", "data.root": "data", "data.attribute": "Male",
        "data.classes": [0, 1], "data.minority_classes": [1],
    },
    "imagenet": {
        "data.dataset": "imagefolder", "data.root": "data/imagenette2/train", "data.classes": [],
        "data.minority_names": IMAGENETTE_MINORITIES,
    },
}
SIZES: dict[str, dict[str, dict[str, Any]]] = {
    "celeba": {
        "smoke": {"data.image_size": 16, "data.per_class": 24, "data.minority_count": 8,
                  "data.classifier_test_per_class": 6, "data.reference_per_class": 10},
        "default": {"data.image_size": 64, "data.per_class": 4096, "data.minority_count": 1024,
                    "data.classifier_test_per_class": 500, "data.reference_per_class": 1000,
                    "eval.classifier_epochs": 4},
        # The paper trains on Celeb-A's own mix (42% male in the training partition): 4096 women, ~2966 men.
        "paper": {"data.image_size": 64, "data.per_class": 4096, "data.mix": "natural",
                  "data.classifier_test_per_class": 500, "data.reference_per_class": 1000,
                  "eval.classifier_epochs": 4},
    },
    "imagenet": {
        "smoke": {"data.image_size": 16, "data.per_class": 12, "data.minority_count": 4,
                  "data.classifier_test_per_class": 3, "data.reference_per_class": 5},
        "default": {"data.image_size": 128, "data.per_class": 512, "data.minority_count": 128,
                    "data.classifier_test_per_class": 100, "data.reference_per_class": 200},
        # The authors' geometry: 256 px images, 32x32 latents (an 8x VAE) for the paper's 6-level UNet.
        "paper": {"data.image_size": 256, "data.per_class": 512, "data.minority_count": 128,
                  "data.classifier_test_per_class": 100, "data.reference_per_class": 200},
    },
}


def task_config(task: str, preset: str | None, yaml_path: str | None, overrides: dict[str, Any],
                unconstrained: bool | None = None) -> Config:
    """The task's defaults for ``preset``, then the YAML file, then ``overrides`` (flags)."""
    if task not in TASKS:
        raise ConfigError(f"task: {task!r} not allowed; allowed: {', '.join(TASKS)}")
    sizes = SIZES[task].get(preset or "", SIZES[task]["default"])
    cfg = build_config(preset, yaml_path, overrides, unconstrained, defaults={**TASKS[task], **sizes})
    if task == "imagenet" and not cfg.model.vae:
        raise ConfigError("model.vae: the ImageNet task is latent diffusion; give a local diffusers AutoencoderKL "
                          "folder, e.g. --vae /models/sd-vae-ft-mse")
    return cfg
