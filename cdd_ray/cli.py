"""Flags shared by the jobs: preset, YAML config, ``--set`` overrides, Ray placement."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from typing import NoReturn

from cdd_ray.config import PRESETS, Config, ConfigError, build_config, parse_set


def add_config_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="model/budget preset (default: cpu; paper = the authors' 32x32 UNet)")
    p.add_argument("--config", default=None, help="YAML file with config sections (data, model, dual, optim, eval, ray)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config field, e.g. --set dual.eta=0.05 (repeatable)")
    p.add_argument("--unconstrained", action="store_true", default=None,
                   help="train the unconstrained baseline (no constraints, no dual steps)")
    p.add_argument("--name", default=None, help="run name (Ray run folder under --storage)")


def add_ray_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workers", type=int, default=None, help="Ray Train workers (data parallel)")
    p.add_argument("--gpu", action="store_true", default=None, help="one GPU per worker")
    p.add_argument("--storage", default=None, help="absolute path or URI for Ray run storage (default runs/ray)")
    p.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else local)")
    p.add_argument("--resume", action="store_true", help="continue the run --name from its latest checkpoint")


_FLAG_KEYS = {"name": "name", "workers": "ray.workers", "gpu": "ray.gpu", "storage": "ray.storage",
              "address": "ray.address"}


def config_from_args(args: argparse.Namespace) -> Config:
    """Build and validate the config, or exit with the error message (status 2)."""
    try:
        if getattr(args, "resume", False) and not args.name:
            raise ConfigError("--resume needs --name: the run to continue")
        overrides = parse_set(args.overrides)
        for flag, key in _FLAG_KEYS.items():
            if getattr(args, flag, None) is not None:
                overrides[key] = getattr(args, flag)
        cfg = build_config(args.preset, args.config, overrides, args.unconstrained)
        if args.name is None and cfg.name == Config.name:
            kind = "baseline" if cfg.unconstrained else "constrained"
            cfg.name = f"{cfg.model.preset}-{kind}-{time.strftime('%Y%m%d-%H%M%S')}"
        return cfg
    except ConfigError as e:
        fail(e)


def fail(e: Exception) -> NoReturn:
    print(f"error: {e}", file=sys.stderr)
    raise SystemExit(2)


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
