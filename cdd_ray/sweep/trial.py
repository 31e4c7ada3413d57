"""One trial of a sweep: a Tune function trainable that fits a Ray Train ``TorchTrainer`` with the trial's config, in
its own MLflow child run; and the run names that make a list of trials read well."""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import ray.tune
from ray.tune import Callback
from ray.tune.integration.ray_train import TuneReportCallback

from cdd_ray import storage as storage_io, tracking
from cdd_ray.cluster.trainer import make_trainer
from cdd_ray.runner import fit_tracked, mlflow_run_for
from cdd_ray.sweep.space import trial_config
from cdd_ray.sweep.table import short_name, trial_number

log = logging.getLogger(__name__)


def run_trial(config: dict[str, Any]) -> None:
    """Tune function trainable: one Ray Train fit with the trial's params, its own MLflow child run."""
    sweep = config["sweep"]
    params = {k: config[k] for k in sweep["param_keys"]}
    cfg = trial_config(sweep["base"], params, sweep.get("baseline_losses"))
    trial_id = ray.tune.get_context().get_trial_id()
    cfg.name = f"{sweep['name']}-{trial_id}"
    uri = sweep["mlflow_uri"]
    store = storage_io.join(sweep["outputs"], trial_id)  # in the run storage: local (shared) folder or a URI
    if storage_io.read_text(storage_io.join(store, "trial.json")):  # finished before the sweep was interrupted
        summary = json.loads(storage_io.read_text(storage_io.join(store, "summary.json")))
        ray.tune.report({k: v for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
        return
    # a trial restarted by a resumed sweep continues its own run
    run_id = mlflow_run_for(storage_io.join(store, "mlflow_run_id"), cfg, uri, resume=True,
                            parent_run_id=sweep["parent_run_id"],
                            tags={"ray_trial_id": trial_id, "sweep": sweep["name"], "role": "trial"})
    # The outputs land in the storage; with a URI through a folder of this node's that is then removed.
    out = Path(store) if not storage_io.is_uri(store) else Path(tempfile.mkdtemp(prefix=f"cdd-{trial_id}-"))

    def publish() -> None:
        if storage_io.is_uri(store):
            storage_io.upload(out, store)
            shutil.rmtree(out, ignore_errors=True)
        storage_io.write_text(storage_io.join(store, "trial.json"),  # last: the trial is done
                              json.dumps({"trial_id": trial_id, "run_id": run_id, "params": params}))

    # no progress bar: the sweep's table (cdd_ray.sweep.table.SweepTable) shows every trial
    fit_tracked(lambda: make_trainer(cfg, sweep["storage"], cfg.name, sweep["resources"],
                                     callbacks=[TuneReportCallback()], mlflow={"uri": uri, "run_id": run_id},
                                     progress=False, verbose=sweep.get("verbose", False)),
                cfg.ray.max_failures, uri, run_id, out, then=publish)


def trial_run_name(number: int, params: dict[str, Any]) -> str:
    """A trial's MLflow run name, so a list of them reads well: ``t03 resilient gamma=0.21 eta=0.12 ...`` (the
    searched params that the trial's dual kind uses: b_rel is unused by resilient trials, gamma by plain ones)."""
    kind = params.get("dual.kind")
    unused = {"resilient": "dual.b_rel", "plain": "dual.gamma"}.get(str(kind))
    shown = [f"{short_name(k)}={v:.2g}" if isinstance(v, float) else f"{short_name(k)}={v}"
             for k, v in params.items() if k not in ("dual.kind", unused)]
    return " ".join([f"t{number:02d}", *([str(kind)] if kind else []), *shown])


class TrialRunNames(Callback):
    """Names each trial's MLflow run (``trial_run_name``, tag ``trial``: ``t03``) once the trial has created it:
    the number is the trial's place in Tune's list, as in the console's table and the front.

    The storage read and the MLflow write run on a thread of their own, never in Tune's event loop: each can take
    seconds (a busy SQLite store, a remote bucket or server; up to ``CDD_RAY_MLFLOW_RETRY_S`` while a server is
    away), and Tune's loop, which schedules every trial, would wait for them. The sweep's end waits for them."""

    def __init__(self, uri: str, outputs: str, param_keys: list[str]):
        self.uri, self.outputs, self.param_keys = uri, outputs, param_keys
        self.named: set[str] = set()
        self.asked: set[str] = set()  # trials being named now
        self.pool: ThreadPoolExecutor | None = None

    def __getstate__(self):  # a restored sweep's Tuner unpickles its callbacks: no thread pool in them
        return {**self.__dict__, "pool": None, "asked": set()}

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if trial.trial_id in self.named or trial.trial_id in self.asked:
            return
        number = trial_number(trial, trials)
        if number is None:
            return
        params = {k: (trial.config or {}).get(k) for k in self.param_keys}
        self.asked.add(trial.trial_id)
        self.pool = self.pool or ThreadPoolExecutor(max_workers=1, thread_name_prefix="trial-run-names")
        self.pool.submit(self._name, trial.trial_id, number, params)

    def _name(self, trial_id: str, number: int, params: dict[str, Any]) -> None:
        try:
            run_id = storage_io.read_text(storage_io.join(self.outputs, trial_id, "mlflow_run_id"))
            if run_id:  # else the trial has not created its run yet: asked again at its next result
                tracking.set_tags(self.uri, run_id.strip(), {"mlflow.runName": trial_run_name(number, params),
                                                             "trial": f"t{number:02d}"})
                self.named.add(trial_id)
        except Exception as e:  # noqa: BLE001 - a name is not worth a sweep: said, and asked again
            log.warning("could not name trial %s's MLflow run: %s", trial_id, e)
        finally:
            self.asked.discard(trial_id)

    def on_experiment_end(self, trials, **info):
        if self.pool is not None:
            self.pool.shutdown(wait=True)
            self.pool = None
