"""What checking a config reads from disk: a VAE folder's latent geometry, an image folder's classes."""

from __future__ import annotations

import json
from pathlib import Path

from cdd_ray.config.errors import ConfigError

def vae_geometry(path: str) -> tuple[int, int]:
    """(latent channels, downsampling factor) of a diffusers AutoencoderKL folder, from its config.json."""
    f = Path(path).expanduser() / "config.json"
    try:
        c = json.loads(f.read_text())
        return int(c["latent_channels"]), 2 ** (len(c["block_out_channels"]) - 1)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"model.vae: {path!r} is not a diffusers AutoencoderKL folder ({f}: {e})") from None

def class_folders(root: str) -> list[str]:
    """imagefolder: the class folder names under ``root``, sorted (class id = position)."""
    r = Path(root).expanduser()
    if not r.is_dir():
        raise ConfigError(f"data.root: {root!r} does not exist or is not a directory (data.dataset=imagefolder "
                          "needs one folder of images per class)")
    names = sorted(p.name for p in r.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(names) < 2:
        raise ConfigError(f"data.root: {root!r} has {len(names)} class folders; data.dataset=imagefolder needs >= 2")
    return names
