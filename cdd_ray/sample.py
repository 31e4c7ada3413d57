"""Sample from a trained model logged to MLflow, a registered model, or a checkpoint folder.

    python -m cdd_ray.sample --run-id 3f2a... --n 64 --out grid.png
    python -m cdd_ray.sample --model models:/cdd-ray-mnist@champion --n 64 --out grid.png
    python -m cdd_ray.sample --checkpoint runs/constrained/checkpoint --n 64 --out grid.png --npz samples.npz
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from cdd_ray import checkpoint, tracking
from cdd_ray.config import Config, ConfigError, config_from_dict
from cdd_ray.data import to_uint8
from cdd_ray.evaluation.sampling import sample
from cdd_ray.model import build_noise_scheduler, decode, load_vae
from cdd_ray.plots import save_grid

MODEL_ARTIFACT = "model"  # the final checkpoint's artifact path in every training run


def download_model(run_id: str, uri: str | None, dst: str) -> Path:
    """Fetch the run's ``model/`` artifact; an unknown run id raises ConfigError naming the run and the URI."""
    uri = uri or tracking.tracking_uri()
    c = tracking.client(uri)
    try:
        c.get_run(run_id)
    except Exception as e:  # noqa: BLE001
        raise ConfigError(f"MLflow run {run_id!r} not found in {uri!r}: {e}") from None
    return Path(c.download_artifacts(run_id, MODEL_ARTIFACT, dst))


def draw(unet, cfg: Config, n: int, steps: int | None, seed: int, device: str, vae=None) -> torch.Tensor:
    """``n`` images in [-1, 1] from ``seed`` with the run's sampler (``steps`` DDIM steps, default the run's
    eval.sampler_steps); ``vae`` decodes latent samples."""
    x = sample(unet.to(device), build_noise_scheduler(cfg.model), n, steps or cfg.eval.sampler_steps,
               cfg.eval.batch_size, seed, device)
    return decode(vae, x) if vae is not None else x


def generate(ckpt_dir: str | Path, n: int, steps: int | None, seed: int, device: str) -> np.ndarray:
    unet, _, cfg_dict = checkpoint.load_model(ckpt_dir)
    cfg = config_from_dict(cfg_dict)
    vae = None
    if cfg.model.vae:  # latent diffusion: the run's VAE (a local folder) decodes the samples
        if not Path(cfg.model.vae).expanduser().is_dir():
            raise ConfigError(f"model.vae: the run's VAE {cfg.model.vae!r} is not on this machine; it decodes the "
                              "latent samples")
        vae = load_vae(cfg.model.vae, device)
    return to_uint8(draw(unet, cfg, n, steps, seed, device, vae))


def generate_registered(model_uri: str, n: int, steps: int | None, seed: int, uri: str | None) -> np.ndarray:
    """Images from a registered pyfunc model (``models:/NAME@ALIAS`` or ``models:/NAME/VERSION``)."""
    import mlflow

    mlflow.set_tracking_uri(uri or tracking.tracking_uri())
    try:
        model = mlflow.pyfunc.load_model(model_uri)
    except Exception as e:  # noqa: BLE001 - MLflow's errors for a missing name, alias or version
        raise SystemExit(f"error: --model {model_uri!r}: {str(e)[:300]}") from None
    return model.predict({"n": n, "seed": seed, **({"steps": steps} if steps else {})})["images"]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run-id", help="MLflow run id of a training run")
    src.add_argument("--model", help="a registered model (cdd_ray.register), e.g. models:/cdd-ray-mnist@champion")
    src.add_argument("--checkpoint", help="a checkpoint folder (unet_ema/, config.json, ...)")
    p.add_argument("--tracking-uri", default=None, help="default: MLFLOW_TRACKING_URI or sqlite:///mlflow.db")
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--steps", type=int, default=None, help="DDIM steps (default: the run's eval.sampler_steps)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default="samples.png", help="grid PNG")
    p.add_argument("--npz", default=None, help="also save the images as uint8 in this .npz")
    args = p.parse_args(argv)
    if args.n <= 0:
        p.error(f"--n: {args.n} must be > 0")
    if args.model:
        images = generate_registered(args.model, args.n, args.steps, args.seed, args.tracking_uri)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            try:
                ckpt = download_model(args.run_id, args.tracking_uri, tmp) if args.run_id else Path(args.checkpoint)
                images = generate(ckpt, args.n, args.steps, args.seed, args.device)
            except (ConfigError, checkpoint.CheckpointError) as e:
                raise SystemExit(f"error: {e}") from None
    save_grid(images, args.out)
    if args.npz:
        np.savez_compressed(args.npz, images=images)
    print(f"wrote {args.n} samples ({images.shape[1]}x{images.shape[2]}) to {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
