"""The Ray Train worker: the function each worker of a run's ``TorchTrainer`` runs around the pure loop
(``cdd_ray.core.loop.train``): resume from Ray's (or a newer) checkpoint, report windows and checkpoints to Ray
Train, send each dual step's metrics to MLflow (rank 0), evaluate and write the run's outputs (rank 0), and the
test hooks that fail a worker on purpose (``fault.*``)."""

from __future__ import annotations

import logging
import contextlib
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from cdd_ray import checkpoint
from cdd_ray.checkpoint import Snapshot
from cdd_ray.cluster.faults import dual_dumper, make_fault
from cdd_ray.config import Config, ConfigError, config_from_dict
from cdd_ray.core.loop import Hooks, LoopResult, Worker, train
from cdd_ray.data import Split, prepare_split
from cdd_ray.evaluation.run import evaluate
from cdd_ray.model import build_noise_scheduler
from cdd_ray.outputs import build_summary, write_outputs
from cdd_ray.preflight import check_node_files, on_node
from cdd_ray.progress import make_bar, with_bar
from cdd_ray.tracking import PENDING_FILE, MetricBuffer, dual_step_metrics, last_logged_primal_step

log = logging.getLogger(__name__)


def ray_progress(start: int, total: int):
    """Rank 0's bar in a Ray worker when the driver's console is a terminal: Ray draws it on the driver
    (``ray.experimental.tqdm_ray``). In a log the worker passes ``"lines"`` instead (``LineProgress``)."""
    from ray.experimental.tqdm_ray import tqdm

    bar = tqdm(total=total, desc="train", unit="step", flush_interval_s=2.0)
    bar.n = start
    return bar


def _quiet_report_lines(verbose: bool) -> None:
    """Ray Train logs every report (the whole metrics dict, the checkpoint path) at INFO on a logger named by its
    file, outside the ``ray.train`` logger whose console level RunConfig's LoggingConfig sets: that one too."""
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:  # another Ray Train
        return
    logging.getLogger(context.__file__).setLevel(logging.INFO if verbose else logging.WARNING)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """The function each Ray Train worker runs: restore, train, checkpoint, evaluate (rank 0), report.

    ``config``: {"cfg": Config.to_dict(), "fault_marker": path or None,
    "mlflow": {"uri": ..., "run_id": ...} or None (rank 0 then logs every dual step's metrics),
    "progress": rank 0's progress on the driver's console ("bar", "lines" or False), "verbose": Ray Train's line
    per report on it too, "run_dir": the run's local folder, where Ray keeps its checkpoints, or None}.
    Reports (all ranks, the same number of times): every ``ray.checkpoint_every`` dual steps with a
    checkpoint, and once at the end with the final checkpoint, the evaluation metrics and the run's
    output files (in the checkpoint's ``outputs/`` folder). With ``ray.report_every`` > 0, also every
    ``ray.report_every`` primal steps (not the final one) a metrics-only report of that window's mean losses
    (``step``, ``asha_loss``, ``window_loss_*``): the only reports that carry ``asha_loss``, so ASHA
    (``time_attr="step"``) compares trials at the same primal steps whatever their ``dual.primal_steps``.
    """
    import ray.train  # Ray on the worker's path only: the jobs import this module before they decide to start Ray
    import ray.train.torch

    _quiet_report_lines(config.get("verbose", False))
    t0 = time.perf_counter()
    cfg = config_from_dict(config["cfg"])
    ctx = ray.train.get_context()
    worker = Worker(ctx.get_world_rank(), ctx.get_world_size(), ray.train.torch.get_device())
    if cfg.optim.threads > 0:
        torch.set_num_threads(cfg.optim.threads)
    try:  # the driver decided the source and the paths (cdd_ray.preflight): honour them or say where not
        split = prepare_split(cfg, evaluation=worker.rank == 0)  # only rank 0 evaluates: only it holds that data
        if worker.rank == 0:
            check_node_files(cfg)
    except ConfigError as e:
        raise on_node(e) from None
    resume = resume_point(ray.train.get_checkpoint(), config.get("run_dir"))
    reports = Reports(ray.train, cfg, worker, config.get("mlflow") if worker.rank == 0 else None, resume)
    progress = config.get("progress", "bar")  # "bar": Ray draws it on the driver; "lines" (a log) or False
    start = int(resume.meta["step"]) if resume is not None else 0
    bar = (make_bar(ray_progress if progress in (True, "bar") else progress, start, cfg.optim.steps)
           if worker.rank == 0 else None)
    hooks = Hooks(prepare_model=ray.train.torch.prepare_model,
                  before_step=make_fault(cfg.fault, worker.rank, config.get("fault_marker")),
                  on_block=with_bar(bar, cfg.constraint_names(), reports.on_block),
                  on_report=reports.on_report if cfg.ray.report_every > 0 else None)
    result = train(cfg, split, worker, resume=resume, hooks=hooks)
    if bar is not None:
        bar.close()
    reports.final(result, split, resume, time.perf_counter() - t0)


@contextlib.contextmanager
def checkpoint_files(ckpt: Any) -> Iterator[str]:
    """A Ray checkpoint's files in a local folder this process alone reads: the checkpoint's own folder on a local
    filesystem, else a private download removed afterwards. Not Ray's ``as_directory()`` for a remote checkpoint:
    its processes on one node share one download folder, and one that arrives after another's download re-downloads
    into it, truncating the files the other is reading (two workers of a run resuming from S3 on one machine read
    an empty ``dual_state.json``)."""
    import pyarrow.fs

    if isinstance(ckpt.filesystem, pyarrow.fs.LocalFileSystem):
        yield ckpt.path
        return
    folder = tempfile.mkdtemp(prefix="cdd-ray-checkpoint-")
    try:
        yield ckpt.to_directory(folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def resume_point(ckpt: Any, run_dir: str | None) -> Snapshot | None:
    """The state a (re)started worker group continues from: Ray's checkpoint (``ckpt``), or a newer complete one in
    ``run_dir``; None for a fresh start."""
    resume = None
    if ckpt is not None:
        with checkpoint_files(ckpt) as d:
            resume = checkpoint.load(d)
    if run_dir:
        # A run aborted by Ctrl-C can hold checkpoints that Ray uploaded but had not yet registered in its
        # snapshot (Ray would then start from scratch): continue from the newest complete one.
        newer = checkpoint.newest(Path(run_dir).glob("checkpoint_*"),
                                  after_step=resume.meta["step"] if resume is not None else -1)
        if newer is not None:
            log.info("resuming from %s (step %d), newer than Ray's registered checkpoint", newer[0],
                     newer[1].meta["step"])
            resume = newer[1]
    return resume


class Reports:
    """What a worker tells Ray Train and MLflow: checkpoints every ``ray.checkpoint_every`` dual steps, the report
    windows ASHA reads, every dual step's metrics to MLflow (rank 0, ``mlflow`` = {"uri", "run_id"}), and the final
    report with the evaluation and the run's outputs. A checkpoint due where a report window ends travels in that
    window's report (Ray Train takes one report at a time, each after its controller's poll). Every rank reports the
    same number of times. ``train_api``:
    the ``ray.train`` module (imported by the worker's function only)."""

    def __init__(self, train_api: Any, cfg: Config, worker: Worker, mlflow: dict[str, str] | None,
                 resume: Snapshot | None):
        self.train_api, self.cfg, self.worker = train_api, cfg, worker
        names = cfg.constraint_names()
        self.dump = (dual_dumper(cfg.fault.dump_dual_dir, worker.rank, names)
                     if cfg.fault.dump_dual_dir and names else None)
        self.snap: Snapshot | None = None  # the final state, taken at the last dual step
        self.held: tuple[dict[str, float], Snapshot] | None = None  # a checkpoint sent with the next window's report
        self.buffer = MetricBuffer(mlflow["uri"], mlflow["run_id"]) if mlflow else None
        # a restart: the dual steps MLflow already has (sent at a report after the checkpoint)
        self.logged_through = (last_logged_primal_step(mlflow["uri"], mlflow["run_id"])
                               if mlflow and resume is not None else 0)

    def flush(self) -> None:
        if self.buffer is not None:
            self.buffer.flush(raise_errors=False)

    def report(self, metrics: dict[str, float], snap: Snapshot | None,
               extra: Callable[[str], None] | None = None) -> None:
        """A report to Ray Train; rank 0 adds ``snap`` as its checkpoint (and ``extra``'s files in it)."""
        if self.worker.rank != 0 or snap is None:
            self.train_api.report(metrics)
            return
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint.save(os.path.join(tmp, "ckpt"), snap)
            if extra is not None:
                extra(os.path.join(tmp, "ckpt"))
            self.train_api.report(metrics,
                                  checkpoint=self.train_api.Checkpoint.from_directory(os.path.join(tmp, "ckpt")))

    def on_block(self, metrics: dict[str, float], snapshot: Callable[[], Snapshot]) -> None:
        if self.dump is not None:
            self.dump(metrics)
        if self.buffer is not None and metrics["step"] > self.logged_through:
            self.buffer.add(*next(iter(dual_step_metrics([metrics]))))
        if metrics["step"] >= self.cfg.optim.steps:
            self.snap = snapshot()  # a collective: every rank takes it
            return
        if (metrics["step"] // self.cfg.dual.primal_steps) % self.cfg.ray.checkpoint_every == 0:
            self.flush()
            if self.window_ends(metrics["step"]):  # one report carries both: Ray Train takes one at a time
                self.held = (metrics, snapshot())
            else:
                self.report(metrics, snapshot())

    def window_ends(self, step: int) -> bool:
        """Does a report window end at primal step ``step`` (the loop sends it right after this dual step)?"""
        every = self.cfg.ray.report_every
        return every > 0 and step % every == 0 and step < self.cfg.optim.steps

    def on_report(self, metrics: dict[str, float]) -> None:
        # ASHA may stop the trial on this report and Ray then ends its processes from outside: every dual step's
        # metrics so far go to MLflow first (rank 0), not only those before the last checkpoint.
        self.flush()
        if self.held is not None:  # the checkpoint of the dual step just before, with the window's metrics
            (block, snap), self.held = self.held, None
            self.report(block | metrics, snap)
        else:
            self.train_api.report(metrics)  # every rank, at the same steps; no checkpoint

    def final(self, result: LoopResult, split: Split, resume: Snapshot | None, wall_s: float) -> None:
        """The last report: rank 0 evaluates and sends the metrics, the final checkpoint and the run's outputs."""
        cfg, worker = self.cfg, self.worker
        metrics = dict(result.history[-1]) if result.history else {"step": result.step}
        snap = self.snap
        if snap is None and resume is not None and result.start_step >= cfg.optim.steps:
            snap = resume  # restarted after the last step: the final state is the checkpoint itself
        self.flush()  # what is left travels with the outputs to the driver
        if worker.rank != 0:
            self.report(metrics, None)
            return
        ev = evaluate(result.ema_unet, build_noise_scheduler(cfg.model), split, cfg, result.dual.by_name(),
                      worker.device)
        summary = build_summary(cfg, result, ev, split, wall_s, worker.world_size)
        metrics.update({k: v for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
        metrics.update({f"share_{c}": v for c, v in zip(summary["class_ids"], summary["class_shares"])})

        def outputs(d: str) -> None:
            write_outputs(os.path.join(d, "outputs"), cfg, result, ev, summary)
            if self.buffer is not None:
                self.buffer.save_pending(os.path.join(d, "outputs", PENDING_FILE))

        self.report(metrics, snap, extra=outputs)
