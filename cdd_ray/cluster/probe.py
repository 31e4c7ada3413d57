"""Measure the machine where a run's workers run: ``cdd_ray.calibrate.measure`` as one Ray task holding what one
worker of a run holds (its CPUs, its GPU), so the sweep's plan is built on the speed its runs will see, on a GPU
node of a cluster whose driver has none too."""

from __future__ import annotations

from typing import Any

from cdd_ray.calibrate import measure
from cdd_ray.config import Config


def calibrate_on_a_worker(shapes: dict[str, Config], resources: dict[str, float], samples: int) -> dict[str, Any]:
    """``measure`` of the run ``shapes`` ({name: resolved Config}) in a Ray task of ``resources`` (a worker's, from
    ``cdd_ray.cluster.trainer.worker_resources``), with the CPU threads a worker of that size uses."""
    import ray

    dicts = {}
    for name, cfg in shapes.items():
        d = cfg.to_dict()
        if not cfg.ray.gpu and cfg.optim.threads == 0:  # as make_trainer: threads from the worker's CPU share
            d["optim"]["threads"] = max(1, int(resources["CPU"]))
        dicts[name] = d
    task = ray.remote(num_cpus=resources.get("CPU", 1), num_gpus=resources.get("GPU", 0), max_retries=0)(measure)
    return ray.get(task.remote(dicts, samples))
