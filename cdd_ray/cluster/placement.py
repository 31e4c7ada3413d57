"""How many workers and trials a Ray cluster holds, and what each worker asks for, from its nodes.

Sized from every alive node's own CPUs and GPUs (``ray.nodes()``), never from the driver's devices or the
cluster's totals alone: a worker never asks a node for more than that node has (Ray would wait for a node
that never comes), and a CPU-only head node of a GPU cluster holds no GPU worker. A job that starts its own Ray
is checked against this machine (``local_nodes``) before that Ray starts. Pure except
``cluster_nodes``/``local_nodes``; unit-tested on heterogeneous node lists.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from cdd_ray.config import Config, ConfigError

EPS = 1e-9
MIN_CPU_WORKER = 0.5  # a CPU worker below half a core: Ray Train deadlocks when trial drivers take the rest
TRIAL_CPU = 0.1  # what a Tune trial's own process holds (the function that fits its TorchTrainer)


@dataclass(frozen=True)
class Node:
    cpus: float
    gpus: float = 0.0


def cluster_nodes() -> list[Node]:
    """The connected cluster's alive nodes and their CPUs / GPUs."""
    import ray

    return [Node(float(n["Resources"].get("CPU", 0)), float(n["Resources"].get("GPU", 0)))
            for n in ray.nodes() if n.get("Alive")]


def joins_cluster(address: str = "") -> bool:
    """Does the job join a running cluster (``address`` / RAY_ADDRESS) rather than start a Ray of its own?"""
    return bool(address or os.environ.get("RAY_ADDRESS"))


def local_nodes() -> list[Node]:
    """This machine as the one node of the Ray a job starts for itself (``cdd_ray.cluster.session.init_ray`` gives
    that Ray these CPUs), without starting it (under a second: neither Ray nor torch is started): Ray's CPU count,
    which honours a container's CPU limit, or the CPUs this process may run on when fewer (``taskset -c 0``; Ray
    itself would count every core), and Ray's count of the visible NVIDIA GPUs (CUDA_VISIBLE_DEVICES)."""
    from ray._private.accelerators import NvidiaGPUAcceleratorManager  # Ray's own counts; its public API needs a
    from ray._private.utils import get_num_cpus  # running Ray

    cpus = min(get_num_cpus(), len(os.sched_getaffinity(0))) if hasattr(os, "sched_getaffinity") else get_num_cpus()
    return [Node(float(cpus), float(NvidiaGPUAcceleratorManager.get_current_node_num_accelerators()))]


def fits(nodes: list[Node], trials: int, workers: int, per_cpu: float, gpu: bool, driver_cpu: float = 0.0) -> bool:
    """Can ``trials`` runs, each ``workers`` workers of ``per_cpu`` CPUs (and one GPU with ``gpu``) plus a driver of
    ``driver_cpu`` CPUs, be placed on ``nodes`` at once? Workers first, fullest nodes first; drivers in what is left."""
    need, placed = trials * workers, 0
    free = []
    for n in sorted(nodes, key=lambda n: (-n.gpus, -n.cpus) if gpu else (-n.cpus,)):
        k = math.floor((n.cpus + EPS) / per_cpu) if per_cpu > 0 else need
        if gpu:
            k = min(k, math.floor(n.gpus + EPS))
        k = min(k, need - placed)
        placed += k
        free.append(n.cpus - k * per_cpu)
    if placed < need:
        return False
    return driver_cpu <= 0 or sum(math.floor((f + EPS) / driver_cpu) for f in free) >= trials


def largest_share(nodes: list[Node], trials: int, workers: int, gpu: bool, driver_cpu: float = 0.0) -> float:
    """The most CPUs per worker with which ``fits``; 0 when none (each worker's share of some node, less the
    drivers it may host)."""
    need = trials * workers
    candidates = {(n.cpus - driver_cpu * m) / k for n in nodes if not gpu or n.gpus >= 1
                  for k in range(1, max(need, math.floor(n.gpus + EPS) if gpu else 0) + 1)
                  for m in range(trials + 1) if n.cpus - driver_cpu * m > 0}
    if gpu:  # a GPU worker takes its GPU's share of its node's CPUs, so that the node's other GPUs stay usable
        cap = min(n.cpus / n.gpus for n in nodes if n.gpus >= 1)
        candidates = {c for c in candidates if c <= cap + EPS}
    return next((c for c in sorted(candidates, reverse=True) if fits(nodes, trials, workers, c, gpu, driver_cpu)), 0.0)


def describe(nodes: list[Node]) -> str:
    return ", ".join(f"{n.cpus:g} CPUs" + (f" + {n.gpus:g} GPUs" if n.gpus else "") for n in nodes)


def worker_resources(nodes: list[Node], cfg: Config, trials: int = 1, driver_cpu: float = 0.0) -> dict[str, float]:
    """What each of ``cfg.ray.workers`` workers asks for so that ``trials`` such runs fit at once, or a
    ``ConfigError`` saying why the cluster cannot hold them (before any run is created)."""
    r = cfg.ray
    gpus = sum(math.floor(n.gpus + EPS) for n in nodes)
    if r.gpu and gpus < r.workers * trials:
        raise ConfigError(f"ray.workers={r.workers} with ray.gpu=true needs {r.workers * trials} GPUs; the cluster has "
                          f"{gpus:g} (nodes: {describe(nodes)})")
    if r.cpus_per_worker:
        if not fits(nodes, trials, r.workers, r.cpus_per_worker, r.gpu, driver_cpu):
            raise ConfigError(f"ray.workers={r.workers} x ray.cpus_per_worker={r.cpus_per_worker:g}"
                              + (f" + {driver_cpu:g} for the trial" if driver_cpu else "")
                              + f" does not fit the cluster's nodes ({describe(nodes)}): a worker runs on one node")
        per = r.cpus_per_worker
    else:
        per = largest_share(nodes, trials, r.workers, r.gpu, driver_cpu)
        if per <= 0 or (not r.gpu and per < MIN_CPU_WORKER - EPS):
            need = ("a GPU worker needs CPUs on a GPU node" if r.gpu
                    else f"a CPU worker needs >= {MIN_CPU_WORKER} CPUs of one node")
            raise ConfigError(f"ray.workers={r.workers} does not fit the cluster's nodes ({describe(nodes)}): {need}")
    return {"CPU": per, **({"GPU": 1.0} if r.gpu else {})}


def sweep_resources(nodes: list[Node], cfg: Config) -> tuple[int, dict[str, float]]:
    """Concurrent trials and per-worker resources for a sweep: every trial's workers and its driver at once.

    GPU trials: one GPU per worker, as many trials as the GPUs hold. CPU trials: about a CPU per worker, as many
    trials as that makes (fewer when the nodes cannot place them); each trial's driver holds 0.1 CPU.
    """
    w, cpus = cfg.ray.workers, sum(n.cpus for n in nodes)
    if cfg.ray.gpu:
        most = sum(math.floor(n.gpus + EPS) for n in nodes) // w
    elif cfg.ray.cpus_per_worker:
        most = int(cpus // (w * cfg.ray.cpus_per_worker + TRIAL_CPU))
    else:
        most = int(cpus // w)
    error = None
    for trials in range(max(most, 1), 0, -1):
        try:
            return trials, worker_resources(nodes, cfg, trials, TRIAL_CPU)
        except ConfigError as e:
            error = e  # the last one: why not even one trial fits
    raise error


def check_this_machine(cfg: Config, sweep: bool = False) -> None:
    """A job that starts a Ray of its own (no ``--address`` / RAY_ADDRESS): refuse what this machine cannot hold
    before that Ray starts (seconds, not a Ray start-up). ``sweep``: at least one trial with its driver."""
    if joins_cluster(cfg.ray.address):
        return
    nodes = local_nodes()
    try:
        sweep_resources(nodes, cfg) if sweep else worker_resources(nodes, cfg)
    except ConfigError as e:
        raise ConfigError(f"{e}; the cluster would be this machine (the job starts a Ray of its own on it; "
                          "--address or RAY_ADDRESS joins a bigger one)") from None
