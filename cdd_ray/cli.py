"""Flags shared by the jobs: preset, YAML config, ``--set`` overrides, Ray placement."""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import time
from dataclasses import dataclass
from typing import Iterator, NoReturn

from cdd_ray.config import PRESETS, Config, ConfigError, build_config, parse_set
from cdd_ray.tracking import TrackingError


def add_config_flags(p: argparse.ArgumentParser, unconstrained: bool = True) -> None:
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="model/budget preset (default: cpu; paper = the authors' 32x32 UNet)")
    p.add_argument("--config", default=None, help="YAML file with config sections (data, model, dual, optim, eval, ray)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config field, e.g. --set dual.eta=0.05 (repeatable)")
    if unconstrained:
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
        check_resume(args)
        cfg = build_config(args.preset, args.config, parse_set(args.overrides) | flag_overrides(args),
                           args.unconstrained)
        return name_run(cfg, args, "baseline" if cfg.unconstrained else "constrained")
    except ConfigError as e:
        fail(e)


def check_resume(args: argparse.Namespace) -> None:
    if getattr(args, "resume", False) and not args.name:
        raise ConfigError("--resume needs --name: the run to continue")


def flag_overrides(args: argparse.Namespace) -> dict[str, object]:
    """Config overrides from the Ray / name flags that were given."""
    return {key: getattr(args, flag) for flag, key in _FLAG_KEYS.items() if getattr(args, flag, None) is not None}


def name_run(cfg: Config, args: argparse.Namespace, kind: str) -> Config:
    """Without --name (and no name in the config): <preset>-<kind>-<time>."""
    if args.name is None and cfg.name == Config.name:
        cfg.name = f"{cfg.model.preset}-{kind}-{time.strftime('%Y%m%d-%H%M%S')}"
    return cfg


@dataclass
class JobGuard:
    """What the job tells ``job_errors`` once it knows: the Ray run to --resume after Ctrl-C."""

    resume_name: str | None = None


@contextlib.contextmanager
def job_errors() -> Iterator[JobGuard]:
    """Bad input: exit 2 with the message. MLflow store away: exit 1 naming the URI. Ctrl-C: exit 130,
    saying how to continue (the runner has already marked the MLflow run KILLED; checkpoints are kept)."""
    guard = JobGuard()
    try:
        yield guard
    except ConfigError as e:
        fail(e)
    except TrackingError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        how = f"; continue with the same command plus --resume --name {guard.resume_name}" if guard.resume_name else ""
        print(f"interrupted: MLflow run marked KILLED, checkpoints kept{how}", file=sys.stderr)
        raise SystemExit(130) from None


def fail(e: Exception) -> NoReturn:
    print(f"error: {e}", file=sys.stderr)
    raise SystemExit(2)


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
