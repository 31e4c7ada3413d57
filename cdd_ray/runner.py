"""Driver side of one training run: in this process (``run_local``) or on Ray Train (``run_ray``).

Both end with the same files in ``out`` (see docs/TRAINING.md): summary.json, samples.npz, PNGs, history and
the final checkpoint.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import torch

from cdd_ray import checkpoint, preflight, storage as storage_io, tracking
from cdd_ray.cluster.placement import check_this_machine
from cdd_ray.cluster.session import init_ray
from cdd_ray.cluster.trainer import collect_outputs, fit_run, make_trainer, worker_resources
from cdd_ray.config import Config
from cdd_ray.core.loop import Hooks, train
from cdd_ray.data import check_source, prepare_split
from cdd_ray.evaluation.run import evaluate
from cdd_ray.metrics import FINETUNE_METRICS, INTERVAL_METRICS
from cdd_ray.model import build_noise_scheduler
from cdd_ray.outputs import build_summary, write_outputs
from cdd_ray.progress import make_bar, with_bar

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
        # SystemExit: Ray ends a trial that Tune (ASHA) stops while it is inside a report with sys.exit(0). A
        # status already set stays: the sweep's driver may have marked a stopped trial FINISHED before its end
        # reaches here (ASHA stopping a trial whose worker was dying).
        status = "KILLED" if isinstance(e, (KeyboardInterrupt, SystemExit)) else "FAILED"
        try:
            tracking.end_run(uri, run_id, status, budget_s=0 if isinstance(e, tracking.TrackingError) else None,
                             if_running=True)
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
    keys = (*INTERVAL_METRICS, "tv_floor", "fd_floor", "copy_floor", "copy_floor_features", "classifier_accuracy",
            "prediction_error",
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
    storage = preflight.check_storage(preflight.resolve_storage(cfg.ray.storage))
    preflight.check_run_name(storage, cfg.name, resume)
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
