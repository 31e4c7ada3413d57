"""Checkpoints: everything needed to continue a primal-dual run exactly, written atomically.

Layout of a checkpoint directory:
    unet/             training weights, diffusers ``save_pretrained`` (safetensors)
    unet_ema/         EMA weights, diffusers ``save_pretrained``: the model to sample from
    trainer_state.pt  optimiser, LR scheduler, EMA, RNG states, step (tensors and plain types only:
                      loaded with ``weights_only=True``)
    dual_state.json   multipliers, thresholds and their full history
    config.json       the resolved run configuration
    meta.json         step counters
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch
from diffusers import UNet2DModel

from cdd_ray.core.dual import DualState

log = logging.getLogger(__name__)
FILES = ("unet", "unet_ema", "trainer_state.pt", "dual_state.json", "config.json", "meta.json")


class CheckpointError(RuntimeError):
    """A checkpoint is missing files or cannot be read."""


@dataclass
class Snapshot:
    """What a checkpoint holds, in memory."""

    unet: UNet2DModel
    ema_unet: UNet2DModel
    trainer_state: dict[str, Any]
    dual: DualState
    config: dict[str, Any]
    meta: dict[str, Any]


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True))


def save(directory: str | Path, snap: Snapshot) -> Path:
    """Write ``snap`` to ``directory`` atomically: a temporary sibling, then one rename.

    An existing checkpoint at ``directory`` is replaced only after the new one is complete.
    """
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        snap.unet.save_pretrained(tmp / "unet", safe_serialization=True)
        snap.ema_unet.save_pretrained(tmp / "unet_ema", safe_serialization=True)
        torch.save(snap.trainer_state, tmp / "trainer_state.pt")
        _write_json(tmp / "dual_state.json", snap.dual.to_dict())
        _write_json(tmp / "config.json", snap.config)
        _write_json(tmp / "meta.json", snap.meta)
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        old = None
        if directory.exists():
            old = directory.with_name(f".{directory.name}.old-{os.getpid()}")
            os.replace(directory, old)
        os.replace(tmp, directory)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"checkpoint file {str(path)!r} is unreadable: {e}") from None


def from_pretrained(cls, path: str | Path):
    """``cls.from_pretrained(path)`` without diffusers' multi-line advice to install ``accelerate`` on every load
    (it only matters for large models: low_cpu_mem_usage where accelerate is installed)."""
    from diffusers.utils import is_accelerate_available

    return cls.from_pretrained(str(path), low_cpu_mem_usage=is_accelerate_available())


def load(directory: str | Path, map_location: str | torch.device = "cpu") -> Snapshot:
    """Read a checkpoint written by :func:`save`; a missing or corrupt file raises CheckpointError."""
    directory = Path(directory)
    missing = [f for f in FILES if not (directory / f).exists()]
    if missing:
        raise CheckpointError(f"checkpoint {str(directory)!r} is incomplete: missing {', '.join(missing)}")
    try:
        unet = from_pretrained(UNet2DModel, directory / "unet")
        ema_unet = from_pretrained(UNet2DModel, directory / "unet_ema")
        trainer_state = torch.load(directory / "trainer_state.pt", map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure to parse is a corrupt checkpoint
        raise CheckpointError(f"checkpoint {str(directory)!r} is corrupt: {type(e).__name__}: {e}") from None
    return Snapshot(
        unet=unet, ema_unet=ema_unet, trainer_state=trainer_state,
        dual=DualState.from_dict(_read_json(directory / "dual_state.json")),
        config=_read_json(directory / "config.json"), meta=_read_json(directory / "meta.json"),
    )


def newest(directories: Iterable[str | Path], after_step: int = -1) -> tuple[Path, Snapshot] | None:
    """The loadable checkpoint with the highest step above ``after_step`` among ``directories``, or None.

    Incomplete or corrupt ones (a copy cut off by a crash) are skipped with a warning.
    """
    found = []
    for d in map(Path, directories):
        if not d.is_dir():
            continue
        try:
            step = int(_read_json(d / "meta.json")["step"])
        except (CheckpointError, KeyError, TypeError, ValueError):
            continue
        if step > after_step:
            found.append((step, str(d)))
    for _, d in sorted(found, reverse=True):
        try:
            return Path(d), load(d)
        except CheckpointError as e:
            log.warning("skipping checkpoint: %s", e)
    return None


def load_model(directory: str | Path, ema: bool = True) -> tuple[UNet2DModel, DualState, dict[str, Any]]:
    """The sampling model (EMA weights by default), dual state and config of a checkpoint."""
    directory = Path(directory)
    sub = "unet_ema" if ema else "unet"
    if not (directory / sub).exists():
        raise CheckpointError(f"checkpoint {str(directory)!r} has no {sub}/ folder")
    try:
        unet = from_pretrained(UNet2DModel, directory / sub)
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"checkpoint {str(directory)!r} is corrupt: {type(e).__name__}: {e}") from None
    return unet, DualState.from_dict(_read_json(directory / "dual_state.json")), _read_json(directory / "config.json")
