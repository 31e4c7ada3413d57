"""How the sweep searches: Optuna over two objectives (and fairness targets as constraints) behind Ray Tune, ASHA
on the primal-step clock, the study kept in SQLite where optuna-dashboard and a resumed sweep find it."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import optuna
from ray import tune
from ray.tune import schedulers
from ray.tune.search.optuna import OptunaSearch

from cdd_ray import storage as storage_io
from cdd_ray.config import Config
from cdd_ray.console import tune_verbosity
from cdd_ray.metrics import ASHA_LOSS, MAXIMISED
from cdd_ray.samplers import make_sampler
from cdd_ray.sweep.space import SearchSpace, to_tune
from cdd_ray.sweep.table import SweepTable
from cdd_ray.sweep.trial import TrialRunNames, run_trial

log = logging.getLogger(__name__)


def make_searcher(objectives: tuple[str, str], seed: int, limits: dict[str, float], sampler: str,
              storage: str = "", study_name: str = "cdd-ray") -> OptunaSearch:
    """OptunaSearch over ``objectives`` (each in its own direction). With fairness ``limits`` every finished
    trial hands Optuna its slack (metric - limit <= 0: feasible), and the sampler searches under them.
    ``storage``: an Optuna RDB URL (``sqlite:///<sweep>/study/optuna.db``) that keeps the study where
    optuna-dashboard and a resumed sweep find it; empty: in memory."""
    modes = ["max" if o in MAXIMISED else "min" for o in objectives]
    return ConstrainedOptunaSearch(limits, metric=list(objectives), mode=modes, sampler=make_sampler(sampler, seed),
                                   storage=optuna.storages.RDBStorage(storage) if storage else None,
                                   study_name=study_name)


class ConstrainedOptunaSearch(OptunaSearch):
    """OptunaSearch that tells Optuna how every trial ended, and each finished trial's fairness slack
    (metric - limit) as constraints.

    Ray's OptunaSearch tells a multi-objective trial COMPLETE with ``[None, None]`` when it ended without its
    objectives (ASHA stopped it at a window report): Optuna refuses that, Ray only logs it, and the trial stays
    RUNNING in the study, so the sampler never learns from it (and GPSampler, which models COMPLETE trials only,
    stays in its random start-up). Here a trial with every objective is COMPLETE with them; one without is PRUNED
    (FAIL when it errored), with the primal step it reached and its last ``asha_loss`` as user attributes.
    """

    def __init__(self, limits: dict[str, float], **kw: Any):
        super().__init__(**kw)
        self.limits = dict(limits)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        ot_trial = self._ot_trials.get(trial_id)
        if ot_trial is None or trial_id in self._completed_trials:
            return super().on_trial_complete(trial_id, result, error)
        result = result or {}
        values = [result.get(m) for m in self.metric]
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values):
            if all(isinstance(result.get(m), (int, float)) for m in self.limits):
                for m, x in self.limits.items():
                    ot_trial.set_constraint(m, result[m] - x)
            state = optuna.trial.TrialState.COMPLETE
        else:
            values = None
            state = optuna.trial.TrialState.FAIL if error else optuna.trial.TrialState.PRUNED
            for key, attr in (("step", "stopped_at_step"), (ASHA_LOSS, ASHA_LOSS)):
                if isinstance(result.get(key), (int, float)):
                    ot_trial.set_user_attr(attr, result[key])
        try:
            self._ot_study.tell(ot_trial, values, state=state)
        except (ValueError, RuntimeError) as e:  # e.g. told already before a resumed sweep's last checkpoint
            log.warning("Optuna trial %s (Tune trial %s) not told %s: %s", ot_trial.number, trial_id, state.name, e)
        self._completed_trials.add(trial_id)


def study_url(sweep_dir: Path) -> str:
    """The sweep's Optuna study: SQLite in the sweep folder (``optuna-dashboard <url>`` shows it). A relative
    ``sweep_dir`` gives a URL relative to the working directory (``sqlite:///runs/<name>/...``)."""
    (sweep_dir / "study").mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{sweep_dir / 'study' / 'optuna.db'}"


def searcher_study(sweep_dir: Path, store: str, uri_storage: bool, resume: bool) -> str:
    """The study URL the searcher writes to. Tune pickles the searcher with it and a resumed sweep gets that
    pickle back. In a folder store the study lives in the store (an absolute URL: any driver finds it there).
    With URI storage it lives in the driver's ``runs/<name>`` and is uploaded to the store; the URL is relative
    to the driver's working directory, so a --resume from another driver (or machine) opens its own copy,
    downloaded here from the store."""
    if not uri_storage:
        return study_url(sweep_dir)
    if resume and storage_io.exists(storage_io.join(store, "study", "optuna.db")):
        storage_io.download(storage_io.join(store, "study"), sweep_dir / "study")
    return study_url(Path("runs") / sweep_dir.name)


def study_states(url: str, name: str) -> dict[str, int]:
    """How many of the study's trials ended in each Optuna state (COMPLETE, PRUNED, FAIL; RUNNING: never told)."""
    study = optuna.load_study(study_name=name, storage=url)
    states: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        states[t.state.name] = states.get(t.state.name, 0) + 1
    return states


def make_tuner(space: SearchSpace, trial_base: Config, sweep_cfg: dict[str, Any], store: str, resume: bool,
               objectives: tuple[str, str], seed: int, limits: dict[str, float], sampler: str, study: str,
               num_samples: int, conc: int, verbose: bool) -> tune.Tuner:
    """The sweep's Tuner: ``run_trial`` per trial (0.1 CPU for the trial's own process; its Ray Train workers ask for
    the rest), the searcher over ``objectives``, ASHA, the console's table and the trials' run names; or, for a
    --resume, the Tuner restored from ``store`` (which brings its own RunConfig)."""
    trainable = tune.with_resources(run_trial, {"CPU": 0.1})
    if resume and tune.Tuner.can_restore(storage_io.join(store, "tuner")):
        return tune.Tuner.restore(storage_io.join(store, "tuner"), trainable, resume_errored=True)
    # ASHA's clock is primal steps (time_attr "step"; only the window reports carry ASHA_LOSS). max_t is above any
    # trial's steps: ASHA must never stop a trial at its final report, which would cut off its output collection.
    # One rung at about half the trial, on a multiple of report_every (a report step).
    every = trial_base.ray.report_every
    max_t = int(space.max_value("optim.steps", trial_base.optim.steps)) + 1
    grace = max(every, trial_base.optim.steps // 2 // every * every)
    return tune.Tuner(
        trainable,
        param_space={**to_tune(space), "sweep": sweep_cfg},
        tune_config=tune.TuneConfig(
            search_alg=make_searcher(objectives, seed, limits, sampler, study, trial_base.name),
            scheduler=schedulers.ASHAScheduler(time_attr="step", metric=ASHA_LOSS, mode="min", max_t=max_t,
                                               grace_period=grace, reduction_factor=3),
            num_samples=num_samples, max_concurrent_trials=conc,
        ),
        run_config=tune.RunConfig(name="tuner", storage_path=store, verbose=tune_verbosity(verbose),
                                  callbacks=[SweepTable(list(space.params), trial_base.optim.steps, num_samples, conc,
                                                        objectives),
                                             TrialRunNames(sweep_cfg["mlflow_uri"], sweep_cfg["outputs"],
                                                           list(space.params))]),
    )
