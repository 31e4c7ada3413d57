"""Driver side of one training run: in this process (``run_local``) or on Ray Train (``run_ray``).

Both end with the same files in ``out`` (see docs/TRAINING.md): summary.json, samples.npz, PNGs, history and
the final checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import torch

from cdd_ray import checkpoint, preflight, storage as storage_io, tracking
from cdd_ray.config import Config, ConfigError
from cdd_ray.console import train_log_level
from cdd_ray.core.loop import Hooks, train
from cdd_ray.data import check_source, prepare_split
from cdd_ray.evaluation import evaluate
from cdd_ray.metrics import FINETUNE_METRICS, INTERVAL_METRICS
from cdd_ray.model import build_noise_scheduler
from cdd_ray.outputs import build_summary, write_outputs
from cdd_ray.placement import check_this_machine, cluster_nodes, worker_resources as per_worker
from cdd_ray.progress import make_bar, with_bar
from cdd_ray.session import init_ray, resolve_storage
from cdd_ray.worker import FAULT_ON_LOAD_ENV, KillOnLoad, train_loop_per_worker

log = logging.getLogger(__name__)


def run_local(cfg: Config, out: str | Path, progress: bool = True, track: bool = True,
              parent_run_id: str | None = None, tags: dict[str, str] | None = None) -> dict[str, Any]:
    """Train and evaluate in this process (one worker, no Ray); return the summary. ``parent_run_id`` / ``tags``:
    the MLflow run is a child of that run, with those tags."""
    cfg = preflight.resolve(cfg)
    out = preflight.check_out(out)
    uri = preflight.check_tracking(tracking.tracking_uri())
    run_id = tracking.start_run(cfg, uri, parent_run_id=parent_run_id, extra_tags=tags) if track else None
    with tracked(uri, run_id):
        buffer = tracking.MetricBuffer(uri, run_id) if run_id else None
        summary = _run_local(cfg, out, progress, buffer)
        if run_id:
            finish_tracking(uri, run_id, Path(out).resolve(), summary, buffer)
    return summary


def _run_local(cfg: Config, out: str | Path, progress: bool, buffer: tracking.MetricBuffer | None) -> dict[str, Any]:
    t0 = time.perf_counter()
    if cfg.optim.threads > 0:
        torch.set_num_threads(cfg.optim.threads)
    out = Path(out).resolve()
    split = prepare_split(cfg)
    log.info("data source %s: objective %d images, constraints %s", split.source, split.objective.shape[0],
             {k: v.shape[0] for k, v in split.constraints.items()})
    final: dict[str, checkpoint.Snapshot] = {}

    def keep_last(metrics: dict[str, float], snapshot) -> None:
        if buffer is not None:
            buffer.add(*next(iter(tracking.dual_step_metrics([metrics]))))
        if metrics["step"] >= cfg.optim.steps:
            final["snap"] = snapshot()

    bar = make_bar(progress, 0, cfg.optim.steps)
    result = train(cfg, split, hooks=Hooks(on_block=with_bar(bar, cfg.constraint_names(), keep_last)))
    if bar is not None:
        bar.close()
    ev = evaluate(result.ema_unet, build_noise_scheduler(cfg.model), split, cfg, result.dual.by_name())
    summary = build_summary(cfg, result, ev, split, time.perf_counter() - t0)
    write_outputs(out, cfg, result, ev, summary)
    checkpoint.save(out / "checkpoint", final["snap"])
    return summary


# ---------------------------------------------------------------- MLflow


@contextlib.contextmanager
def tracked(uri: str, run_id: str | None):
    """Mark the MLflow run FINISHED on success, KILLED on Ctrl-C, FAILED on any error; never RUNNING
    (unless the store itself is away: the original error is raised, not the store's)."""
    if run_id is None:
        yield
        return
    try:
        yield
    except BaseException as e:
        # SystemExit: Ray ends a trial that Tune (ASHA) stops while it is inside a report with sys.exit(0).
        status = "KILLED" if isinstance(e, (KeyboardInterrupt, SystemExit)) else "FAILED"
        try:
            tracking.end_run(uri, run_id, status, budget_s=0 if isinstance(e, tracking.TrackingError) else None)
        except tracking.TrackingError as te:
            log.error("could not mark MLflow run %s %s: %s", run_id, status, te)
        raise
    tracking.end_run(uri, run_id, "FINISHED")


def finish_tracking(uri: str, run_id: str, out: Path, summary: dict[str, Any],
                    buffer: tracking.MetricBuffer | None = None) -> None:
    """After the outputs are on disk: the buffered per-step metrics, then ``log_final``. A store that stays
    away raises ``TrackingError`` saying the outputs are complete."""
    try:
        if buffer is not None:
            buffer.flush()
        tracking.log_pending(uri, run_id, out / tracking.PENDING_FILE)
        (out / tracking.PENDING_FILE).unlink(missing_ok=True)
        log_final(uri, run_id, out, summary)
    except tracking.TrackingError as e:
        raise tracking.TrackingError(f"{e}; the run's outputs and checkpoint are complete in {str(out)!r}") from e
    summary["mlflow_run_id"] = run_id


def eval_metrics(summary: dict[str, Any]) -> dict[str, float]:
    """The final metrics in MLflow's groups: ``eval/<metric>`` (with ``eval/<metric>_ci_lo`` / ``_ci_hi``),
    ``share/<class>`` (measured), ``predicted_share/<class>`` (lambda's mixture; ``predicted_share_from_baseline``
    with the baseline's shares as q), ``pretrained_share/<class>``,
    ``time/wall_s`` and ``time/train_s``."""
    keys = (*INTERVAL_METRICS, "tv_floor", "fd_floor", "classifier_accuracy", "prediction_error",
            "prediction_error_floor", "prediction_error_baseline", "prediction_error_baseline_floor",
            *FINETUNE_METRICS)
    m = {f"eval/{k}": float(summary[k]) for k in keys if summary.get(k) is not None}
    for k in INTERVAL_METRICS:
        if summary.get(f"{k}_ci"):
            m[f"eval/{k}_ci_lo"], m[f"eval/{k}_ci_hi"] = map(float, summary[f"{k}_ci"])
    m.update({f"time/{k}": float(summary[k]) for k in ("wall_s", "train_s") if summary.get(k) is not None})
    for name, key in (("share", "class_shares"), ("pretrained_share", "pretrained_shares"),
                      ("predicted_share", "predicted_shares"),
                      ("predicted_share_from_baseline", "predicted_shares_from_baseline")):
        if summary.get(key):
            m.update({f"{name}/{c}": v for c, v in zip(summary["class_ids"], summary[key])})
    return m


def log_final(uri: str, run_id: str, out: Path, summary: dict[str, Any]) -> None:
    """Evaluation metrics, tags and artifacts: outputs at the root, the final checkpoint under ``model/``."""
    step = int(summary.get("dual_steps") or summary.get("steps") or 0)
    tracking.log_metrics(uri, run_id, eval_metrics(summary), step)
    tracking.set_tags(uri, run_id, {"data_source": summary["data_source"], "fid_features": summary["fid_features"]})
    files = [f for f in out.iterdir() if f.is_file() and f.name != tracking.PENDING_FILE]
    with contextlib.ExitStack() as stack:
        import tempfile

        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        for f in files:
            shutil.copy2(f, tmp / f.name)
        tracking.log_artifacts(uri, run_id, tmp)
    tracking.log_artifacts(uri, run_id, out / "checkpoint", "model")


def worker_resources(cfg: Config) -> dict[str, float]:
    """CPUs (and GPU) per worker, from the connected cluster's nodes (``cdd_ray.placement``); a clear error when
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


def check_run_name(storage: str, name: str, resume: bool) -> None:
    """Ray resumes a run whose name exists; make that explicit so nothing is overwritten by accident (local
    storage or a URI alike)."""
    exists = storage_io.exists(storage_io.join(storage, name))
    if exists and not resume:
        raise ConfigError(f"name: a run {name!r} already exists under ray.storage={storage!r}; pass --resume to "
                          "continue it, or choose another --name")
    if resume and not exists:
        raise ConfigError(f"--resume: no run {name!r} under ray.storage={storage!r} to resume")


def run_ray(cfg: Config, out: str | Path, resume: bool = False, track: bool = True,
            verbose: bool = False, parent_run_id: str | None = None, tags: dict[str, str] | None = None
            ) -> dict[str, Any]:
    """Train on Ray Train workers (``cfg.ray``), then copy the final outputs and checkpoint to ``out``.

    Checked before an MLflow run or a Ray run is created: ``out`` and the storage are writable, the run name,
    the data source and that the cluster can hold the workers; ``auto`` choices and paths are decided here
    (``cdd_ray.preflight``), not on the workers. ``verbose``: Ray's own INFO lines on the console
    (``cdd_ray.console``). ``parent_run_id`` / ``tags``: as for ``run_local``.
    """
    check_this_machine(cfg)  # before a local Ray starts
    out = preflight.check_out(out)
    storage = preflight.check_storage(resolve_storage(cfg.ray.storage))
    check_run_name(storage, cfg.name, resume)
    check_source(cfg.data)
    cfg = preflight.resolve(cfg)
    uri = preflight.check_tracking(tracking.tracking_uri())
    init_ray(cfg.ray.address, verbose=verbose)
    resources = worker_resources(cfg)
    run_id = (mlflow_run_for(storage_io.join(storage, cfg.name, "mlflow_run_id"), cfg, uri, resume, parent_run_id,
                             tags) if track else None)
    return fit_tracked(lambda: make_trainer(cfg, storage, cfg.name, resources, verbose=verbose,
                                            mlflow={"uri": uri, "run_id": run_id} if run_id else None),
                       cfg.ray.max_failures, uri, run_id, out)


def fit_tracked(build: Callable[[], Any], max_failures: int, uri: str, run_id: str | None, out: Path,
                then: Callable[[], None] | None = None) -> dict[str, Any]:
    """A Ray run's life after its checks, the same for a job, a sweep's references and its trials: fit the trainer
    ``build()`` makes (``fit_run``), copy its outputs and final checkpoint to ``out``, log them to the MLflow run
    ``run_id`` (if any), run ``then`` (e.g. upload them), and end the MLflow run FINISHED, or FAILED / KILLED with
    the error (``tracked``)."""
    with tracked(uri, run_id):
        summary = collect_outputs(fit_run(build, max_failures), out)
        if run_id:
            finish_tracking(uri, run_id, out, summary)
        if then is not None:
            then()
    return summary


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


def mlflow_run_for(id_file: str, cfg: Config, uri: str, resume: bool, parent_run_id: str | None = None,
                   tags: dict[str, str] | None = None) -> str:
    """A new MLflow run, its id kept in ``id_file`` (beside the Ray run, in the run storage: a path or a URI), or
    with ``resume`` the run whose id is there, marked RUNNING again."""
    saved = storage_io.read_text(id_file) if resume else None
    if saved:
        run_id = saved.strip()
        tracking.client(uri).update_run(run_id, status="RUNNING")
        return run_id
    run_id = tracking.start_run(cfg, uri, parent_run_id=parent_run_id, extra_tags=tags)
    storage_io.write_text(id_file, run_id)
    return run_id


def collect_outputs(ckpt, out: Path) -> dict[str, Any]:
    """Copy the final checkpoint's outputs/ and the checkpoint itself into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    with ckpt.as_directory() as d:
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
