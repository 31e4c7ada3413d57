"""Measure this machine before a sweep trains: a few seconds of the loop's own primal steps and one small evaluation.

A time budget is only kept if the plan knows the machine before the first run, not after it (machines differ by
2.5x on the cpu preset). ``measure`` runs, in the process that calls it (a Ray task with a worker's resources, see
``cdd_ray.cluster.probe``), what every run of the sweep will spend its time on:

- the loop's primal step (``cdd_ray.core.loop.primal_step`` + ``apply_step``: the fused forward, the backward,
  clipping, the finite-loss guard, AdamW, the EMA) at each run shape the sweep trains (the baseline's and the
  costliest trial's), after ``WARMUP_STEPS`` untimed ones, for at least ``min_seconds``; shapes that cost the same
  (``step_cost_key``: the same model, images per step and numerics) are timed once;
- one evaluation (``cdd_ray.evaluation.run.evaluate``) of ``samples`` images: the labeller (trained once here and cached,
  so its one-off cost is paid now), the sampling and the quality metrics, each timed.

Nothing is written but the labeller's cache entry; the model is new and never saved.
"""

from __future__ import annotations

import json
import time
from typing import Any

import torch

from cdd_ray.config import Config, config_from_dict
from cdd_ray.core.loop import Hooks, Worker, apply_step, primal_step, setup
from cdd_ray.data import prepare_split
from cdd_ray.evaluation.run import evaluate

WARMUP_STEPS = 2  # allocator, kernels and caches: the first steps are slower than the rest
MIN_TIMED_STEPS = 3


def images_per_step(cfg: Config, run) -> int:
    """The images one primal step trains on: the objective batch and one batch per recorded loss."""
    return cfg.optim.batch_size + len(run.recorded) * cfg.optim.constraint_batch_size


def step_cost_key(cfg: Config, images: int) -> str:
    """What a primal step's time depends on: the model, the images per step and how they are computed (the
    learning rate, the dual step and the step count do not change it)."""
    o = cfg.optim
    return json.dumps([cfg.to_dict()["model"], images, o.batch_size, o.threads, o.channels_last, o.compile,
                       o.precision, cfg.ray.gpu], sort_keys=True)


def step_seconds(run, worker: Worker, min_seconds: float) -> float:
    """Seconds per primal step of the set-up loop ``run``."""
    run.model.train()
    for _ in range(WARMUP_STEPS):
        primal_step(run)
        apply_step(run)
    n, t0 = 0, time.perf_counter()
    while n < MIN_TIMED_STEPS or time.perf_counter() - t0 < min_seconds:
        primal_step(run)
        apply_step(run)
        n += 1
    if worker.device.type == "cuda":
        torch.cuda.synchronize(worker.device)
    return (time.perf_counter() - t0) / n


def measure(shapes: dict[str, dict[str, Any]], samples: int = 50, min_seconds: float = 3.0) -> dict[str, Any]:
    """Time each run shape in ``shapes`` ({name: Config.to_dict()}, resolved by the driver) and one evaluation of
    ``samples`` images with the first shape's config. Returns seconds per image for each shape (one timing for
    shapes of the same ``step_cost_key``), the evaluation's parts (``eval``: classifier, sampling, quality,
    over-fitting, with ``samples`` and the FID reference's size) and the seconds the data took to load."""
    cfgs = {name: config_from_dict(d) for name, d in shapes.items()}
    first = next(iter(cfgs.values()))
    device = torch.device("cuda" if first.ray.gpu and torch.cuda.is_available() else "cpu")
    if first.optim.threads > 0:
        torch.set_num_threads(first.optim.threads)
    worker = Worker(0, 1, device)
    t0 = time.perf_counter()
    split = prepare_split(first, evaluation=True)
    data_s = time.perf_counter() - t0
    per_image, images, timed = {}, {}, {}
    for name, cfg in cfgs.items():
        run = setup(cfg, split, worker, None, Hooks())
        images[name] = images_per_step(cfg, run)
        key = step_cost_key(cfg, images[name])
        if key not in timed:
            timed[key] = step_seconds(run, worker, min_seconds)
        per_image[name] = timed[key] / images[name]
    small = config_from_dict(first.to_dict())
    small.eval.n_samples = samples
    small.eval.batch_size = min(small.eval.batch_size, samples)
    run = setup(small, split, worker, None, Hooks())
    ev = evaluate(run.unet, run.noise_scheduler, split, small, {}, device)
    parts = ev.summary["eval_s"]
    return {"s_per_image": per_image, "images_per_step": images, "data_s": data_s, "device": str(device),
            "threads": torch.get_num_threads(),
            "eval": {"classifier": parts["classifier"], "sampling": parts["sampling"], "quality": parts["quality"],
                     "overfitting": parts["overfitting"],
                     "samples": samples, "reference": int(split.reference.shape[0])}}
