"""One run's ``TorchTrainer`` on Ray Train: its workers' resources from the cluster's nodes, the trainer
(``make_trainer``), its fit (``fit_run``: Ctrl-C as KeyboardInterrupt, a worker group that dies while it launches
fitted again from the newest checkpoint, a worker's bad input as a ``ConfigError``) and its outputs collected from
the final checkpoint."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import sys
import threading
from pathlib import Path
from typing import Any, Callable

from cdd_ray import storage as storage_io
from cdd_ray.cluster.faults import FAULT_ON_LOAD_ENV, KillOnLoad
from cdd_ray.cluster.placement import cluster_nodes, worker_resources as per_worker
from cdd_ray.cluster.worker import checkpoint_files, train_loop_per_worker
from cdd_ray.config import Config, ConfigError
from cdd_ray.console import train_log_level

log = logging.getLogger(__name__)


def worker_resources(cfg: Config) -> dict[str, float]:
    """CPUs (and GPU) per worker, from the connected cluster's nodes (``cdd_ray.cluster.placement``); a clear error when
    the cluster cannot hold the workers."""
    return per_worker(cluster_nodes(), cfg)


def make_trainer(cfg: Config, storage: str, name: str, resources: dict[str, float], callbacks: list | None = None,
                 mlflow: dict[str, str] | None = None, progress: bool = True, verbose: bool = False):
    """The TorchTrainer of one run. ``progress``: rank 0's progress on the driver's console (a bar Ray draws there
    when it is a terminal, else a line a minute); ``verbose``: Ray Train's INFO lines (a line per report, checkpoint
    paths) on the console too."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    # Ray Train's controller polls workers every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (2 s by default) and each
    # ray.train.report() waits for that poll; 0.5 s keeps a checkpoint report cheap.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    run_dir = None if storage_io.is_uri(storage) else os.path.join(storage, name)  # local: newest checkpoint
    marker = storage_io.join(storage, name, ".fault_fired")
    if cfg.optim.threads == 0 and not cfg.ray.gpu:  # Ray sets OMP threads from the CPU share
        cfg.optim.threads = max(1, int(resources["CPU"]))
    on_load = cfg.fault.kill_on_load
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg.to_dict(), "fault_marker": marker, "mlflow": mlflow, "run_dir": run_dir,
                           "progress": progress and ("bar" if sys.stderr.isatty() else "lines"), "verbose": verbose,
                           "fault_on_load": KillOnLoad(marker + "_on_load") if on_load else None},
        scaling_config=ScalingConfig(num_workers=cfg.ray.workers, use_gpu=cfg.ray.gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(
            name=name, storage_path=storage,
            failure_config=FailureConfig(max_failures=cfg.ray.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.ray.keep_checkpoints),
            callbacks=callbacks, logging_config=LoggingConfig(log_level=train_log_level(verbose)),
            # Ray Train sends a worker's print() to a logger that adds a line: the progress bar's updates (printed
            # by Ray's tqdm_ray) would each add an empty line to the console.
            worker_runtime_env={"env_vars": {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
                                             **({FAULT_ON_LOAD_ENV: "1"} if on_load else {})}},
        ),
    )


def worker_input_error(error: BaseException) -> ConfigError | None:
    """A ``ConfigError`` a worker raised (a path or file missing on its node), to exit 2 like any bad input."""
    for e in getattr(error, "worker_failures", {}).values():
        while e is not None:
            if isinstance(e, ConfigError):
                return ConfigError(str(e).strip().splitlines()[-1].removeprefix("cdd_ray.config.ConfigError: "))
            e = e.__cause__
    return None


def fit_run(build: Callable[[], Any], max_failures: int):
    """Fit the run's trainer (``build()``) and return its final checkpoint; raise its error (a worker's
    ``ConfigError`` as itself).

    Ray Train restarts a worker group whose process dies during training (``ray.max_failures``), but not one that
    dies while the group launches its training function (Ray 2.60's worker group start: a ``ControllerError`` from
    the dead actor ends the fit, as an OOM kill at that moment or a node lost then would). Such a fit is fitted
    again by a new trainer of the same run, which Ray Train resumes from the run's newest checkpoint: at most
    ``max_failures`` times (-1: no limit)."""
    from ray.train import TrainingFailedError

    restarts = 0
    while True:
        try:
            return fit(build()).checkpoint
        except TrainingFailedError as error:  # Ray Train 2.60's fit raises its error
            died = worker_died(error)
            if died:
                release_group_of(error.controller_failure)
            if not died or restarts == max_failures:
                raise worker_input_error(error) or error from None
            restarts += 1
            log.warning("a Ray Train worker died while its run started (%s); restarting the run from its newest "
                        "checkpoint (%d of ray.max_failures=%d)", str(error.controller_failure).splitlines()[0],
                        restarts, max_failures)


def worker_died(error: BaseException) -> bool:
    """A fit that failed because a worker process died where Ray Train does not restart it itself."""
    from ray.exceptions import RayActorError
    from ray.train import ControllerError

    return isinstance(error, ControllerError) and isinstance(error.controller_failure, RayActorError)


def release_group_of(dead: BaseException) -> None:
    """Remove the placement group a dead Ray Train worker ran in. When the worker group dies while it launches,
    Ray Train 2.60 leaves the group reserved (it is not yet the controller's group to shut down): the run's next
    fit, and in a sweep every trial waiting for those CPUs, would wait for it forever."""
    import ray
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    try:  # asked inside the job's Ray, whose processes know its address (this driver's process may not)
        group = ray.get(ray.remote(num_cpus=0)(_placement_group_of).remote(dead.actor_id), timeout=60)
    except Exception as e:  # noqa: BLE001 - said, then the restart goes on: it may find the resources elsewhere
        log.warning("could not look up the dead worker's placement group (%s): it may stay reserved", e)
        return
    if group:
        remove_placement_group(PlacementGroup(ray.PlacementGroupID.from_hex(group)))


def _placement_group_of(actor_id: str) -> str:
    """The placement group an actor ran in (Ray's state API), "" for none."""
    from ray.util.state import get_actor

    actor = get_actor(actor_id)
    return (actor.placement_group_id or "") if actor is not None else ""


def fit(trainer):
    """``trainer.fit()``; Ctrl-C comes back as KeyboardInterrupt. (Ray Train's own SIGINT handler aborts the
    run, keeping its checkpoints, and then calls ``sys.exit``; it stays installed after ``fit``, so the
    previous handler is put back: a later Ctrl-C, e.g. during a sweep, must not reach a finished run.)"""
    main = threading.current_thread() is threading.main_thread()
    if not main:  # a Tune trial's thread: Tune ends a trial it stops (ASHA) with SystemExit, which must go on up
        return trainer.fit()
    previous = signal.getsignal(signal.SIGINT)
    try:
        return trainer.fit()
    except SystemExit as e:
        raise KeyboardInterrupt("Ray Train run aborted by SIGINT") from e
    finally:
        signal.signal(signal.SIGINT, previous)


def collect_outputs(ckpt, out: Path) -> dict[str, Any]:
    """Copy the final checkpoint's outputs/ and the checkpoint itself into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    with checkpoint_files(ckpt) as d:
        for f in Path(d, "outputs").iterdir():
            shutil.copy2(f, out / f.name)
        tmp = out / ".checkpoint.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(d, tmp, ignore=shutil.ignore_patterns("outputs"))
        if (out / "checkpoint").exists():
            shutil.rmtree(out / "checkpoint")
        os.replace(tmp, out / "checkpoint")
    summary = json.loads((out / "summary.json").read_text())
    summary["ray_checkpoint"] = ckpt.path
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
