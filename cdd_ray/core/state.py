"""The loop's state as a checkpoint (``Snapshot``: CPU copies, every rank's random streams gathered) and the
weights a run starts from (a warm start's checkpoint, checked against the model's shape)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from cdd_ray import storage
from cdd_ray.checkpoint import CheckpointError, Snapshot, load_model
from cdd_ray.config import Config, ConfigError
from cdd_ray.core.dual import DualState
from cdd_ray.model import unet_for


def warm_start_weights(directory: str, cfg: Config) -> dict[str, torch.Tensor]:
    """UNet weights of another run's checkpoint (a local folder, or one in the run storage: a URI); the
    architecture must match this run's preset."""
    import tempfile

    if storage.is_uri(directory):
        with tempfile.TemporaryDirectory(prefix="cdd-init-from-") as tmp:
            try:
                storage.download(storage.join(directory, "unet"), Path(tmp) / "unet")  # what load_model reads
                for name in ("dual_state.json", "config.json"):
                    (Path(tmp) / name).write_text(storage.read_text(storage.join(directory, name)) or "")
            except OSError as e:
                raise ConfigError(f"optim.init_from: cannot read {directory!r}: {str(e).splitlines()[0]}") from None
            return warm_start_weights(tmp, cfg)
    unet, _, _ = load_model(directory, ema=False)
    check_shape(unet, cfg, "optim.init_from", directory)
    return unet.state_dict()


def check_shape(unet: torch.nn.Module, cfg: Config, field_: str, directory: str) -> None:
    mine = unet_for(cfg).config
    def norm(v: Any) -> Any:
        return list(v) if isinstance(v, (list, tuple)) else v

    if any(norm(unet.config.get(k)) != norm(v) for k, v in mine.items() if not k.startswith("_")):
        raise CheckpointError(f"{field_}: {directory!r} holds a UNet of another shape "
                              f"(block_out_channels {unet.config.block_out_channels}, sample_size "
                              f"{unet.config.sample_size}) than model.preset={cfg.model.preset!r}")


def snapshot_of(cfg, unet, ema, optimizer, lr_sched, scaler, sampler, noise_gen, dual, step, worker,
              history, monitor_gen=None) -> Snapshot:
    """Current state as a Snapshot (CPU copies); RNG states of every rank are gathered."""
    batches, noise = sampler.state(), noise_gen.get_state()
    monitor = monitor_gen.get_state() if monitor_gen is not None else None
    if worker.world_size > 1:
        gathered: list[Any] = [None] * worker.world_size
        dist.all_gather_object(gathered, (batches, noise, monitor))
        batches_all = [g[0] for g in gathered]
        noise_all = [g[1] for g in gathered]
        monitor_all = [g[2] for g in gathered]
    else:
        batches_all, noise_all, monitor_all = [batches], [noise], [monitor]
    rng = {"batches": batches_all, "noise": [s.cpu() for s in noise_all]}
    if monitor is not None:
        rng["monitor_noise"] = [s.cpu() for s in monitor_all]
    ema_unet = unet_for(cfg)
    ema.copy_to(ema_unet.parameters())
    unet_cpu = unet_for(cfg)
    unet_cpu.load_state_dict({k: v.detach().cpu() for k, v in unet.state_dict().items()})
    trainer_state = copy.deepcopy({  # state_dict()s hold live references to the training tensors
        "optimizer": optimizer.state_dict(),
        "lr_scheduler": lr_sched.state_dict(),
        "ema": ema.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else {},
        "rng": rng,
    })
    return Snapshot(unet=unet_cpu, ema_unet=ema_unet.cpu(), trainer_state=trainer_state,
                    dual=DualState.from_dict(dual.to_dict()), config=cfg.to_dict(),
                    meta={"step": step, "dual_step": dual.step, "history": copy.deepcopy(history)})
