"""Ray Tune + Optuna sweeps: each trial fits a TorchTrainer; the front is (quality FID, tv_to_uniform).

Flow of one sweep (``run_sweep``):
1. an MLflow parent run for the sweep;
2. the unconstrained baseline under the same budget (a child run; its per-class losses anchor the
   relative thresholds ``dual.b_rel`` of plain-constraint trials);
3. the Tuner: a function trainable per trial that builds and fits a TorchTrainer (Ray Train V2) and
   reports through ``TuneReportCallback``; OptunaSearch minimises a quality FID and tv_to_uniform together,
   ASHA stops trials whose ``loss_objective`` lags (see docs/TUNING.md);
4. the Pareto front (pareto.csv, trade-off PNG, best config per objective) logged to the parent run.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import yaml
from ray.tune import Callback
from ray.tune.search.optuna import OptunaSearch

from cdd_ray import compare, preflight, tracking
from cdd_ray import storage as storage_io
from cdd_ray.budget import Plan, Throughput, plan
from cdd_ray.console import SweepTable, short_name, trial_number, tune_verbosity
from cdd_ray.config import Config, ConfigError, allowed_keys, apply_overrides, config_from_dict, flatten, validate
from cdd_ray.data import check_source
from cdd_ray.evaluation.fairness import FLOORS, samples_needed
from cdd_ray.front import (feasibility, format_differences, format_feasibility, format_front, name_of,
                           pareto_front, refuse_incomparable, write_front)
from cdd_ray.metrics import (ASHA_LOSS, BUDGET_COLUMNS, FAIRNESS_METRICS, MAXIMISED, OBJECTIVE_METRICS, OBJECTIVES,
                             SWEEP_METRICS, direction)
from cdd_ray.placement import check_this_machine, cluster_nodes, sweep_resources
from cdd_ray.runner import fit_tracked, make_trainer, mlflow_run_for, tracked, worker_resources
from cdd_ray.session import init_ray, resolve_storage
from cdd_ray.samplers import DEFAULT_SAMPLER, make_sampler

log = logging.getLogger(__name__)

DERIVED_KEYS = ("dual.b_rel", "optim.batch_ratio")
# Equal budget = the same training compute and the same optimiser for every point on the map. These keys change
# one or the other; the references keep the base config's values, so a space that searches one of them compares
# trials with references at another budget (said before training, in the front and in the parent run's tags).
# The shipped spaces search constraint thresholds and dual step sizes only.
BUDGET_KNOBS = ("optim.lr", "optim.steps", "optim.batch_size", "optim.constraint_batch_size", "optim.batch_ratio",
                "optim.warmup", "optim.weight_decay", "optim.grad_clip", "optim.precision")
DISTRIBUTIONS = ("choice", "uniform", "loguniform", "randint")


@dataclass
class SearchSpace:
    params: dict[str, dict[str, Any]]
    fixed: dict[str, Any] = field(default_factory=dict)
    path: str = ""

    def max_value(self, key: str, default: float) -> float:
        """The largest value ``key`` can take in this space (``default`` when it is not searched)."""
        if key not in self.params:
            return default
        kind, args = next(iter(self.params[key].items()))
        return max(args) if kind == "choice" else args[1]


def load_space(path: str | Path) -> SearchSpace:
    """Read and check a search-space file; every error names the file and the entry."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--space: search-space file {str(p)!r} does not exist")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"--space {str(p)!r}: not valid YAML: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("params"), dict) or not data["params"]:
        raise ConfigError(f"--space {str(p)!r}: expected a mapping with a non-empty 'params' section")
    unknown = set(data) - {"params", "fixed"}
    if unknown:
        raise ConfigError(f"--space {str(p)!r}: unknown sections {sorted(unknown)}; allowed: params, fixed")
    keys = set(allowed_keys()) | set(DERIVED_KEYS)
    for key, dist in data["params"].items():
        where = f"--space {str(p)!r}: params.{key}"
        if key not in keys:
            raise ConfigError(f"{where}: unknown key; allowed: config keys or {', '.join(DERIVED_KEYS)}")
        if not isinstance(dist, dict) or len(dist) != 1 or next(iter(dist)) not in DISTRIBUTIONS:
            raise ConfigError(f"{where}: expected one of {{{', '.join(d + ': ...' for d in DISTRIBUTIONS)}}}, got {dist!r}")
        kind, args = next(iter(dist.items()))
        if not isinstance(args, list) or not args:
            raise ConfigError(f"{where}: {kind} needs a list, got {args!r}")
        if kind != "choice":
            if len(args) != 2 or not all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args):
                raise ConfigError(f"{where}: {kind} needs [low, high] numbers, got {args!r}")
            if args[0] >= args[1]:
                raise ConfigError(f"{where}: {kind} needs low < high, got {args!r}")
            if kind == "loguniform" and args[0] <= 0:
                raise ConfigError(f"{where}: loguniform needs low > 0, got {args!r}")
    fixed = flatten(data.get("fixed") or {})
    bad = [k for k in fixed if k not in allowed_keys()]
    if bad:
        raise ConfigError(f"--space {str(p)!r}: fixed has unknown keys {bad}")
    return SearchSpace(params=dict(data["params"]), fixed=fixed, path=str(p))


def to_tune(space: SearchSpace) -> dict[str, Any]:
    """Search space -> Ray Tune distributions (OptunaSearch converts them)."""
    from ray import tune

    make = {"choice": lambda a: tune.choice(a), "uniform": lambda a: tune.uniform(*a),
            "loguniform": lambda a: tune.loguniform(*a), "randint": lambda a: tune.randint(*a)}
    return {k: make[kind](args) for k, d in space.params.items() for kind, args in d.items()}


def trial_config(base: dict[str, Any], params: dict[str, Any], baseline_losses: dict[str, float] | None) -> Config:
    """The base config with a trial's sampled params applied (derived keys resolved), validated."""
    cfg = config_from_dict(base)
    plain = {k: v for k, v in params.items() if k not in DERIVED_KEYS}
    apply_overrides(cfg, plain)
    if "optim.batch_ratio" in params:
        cfg.optim.constraint_batch_size = max(1, cfg.optim.batch_size // int(params["optim.batch_ratio"]))
    if "dual.b_rel" in params and cfg.dual.kind == "plain":
        if not baseline_losses:
            raise ConfigError("dual.b_rel needs the unconstrained baseline's per-class losses")
        cfg.dual.b = [float(params["dual.b_rel"]) * baseline_losses[n] for n in cfg.constraint_names()]
    validate(cfg)
    return cfg


# ---------------------------------------------------------------- the trial


def run_trial(config: dict[str, Any]) -> None:
    """Tune function trainable: one Ray Train fit with the trial's params, its own MLflow child run."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

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

    # no progress bar: the sweep's table (cdd_ray.console.SweepTable) shows every trial
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


# ---------------------------------------------------------------- the sweep


@dataclass
class SweepResult:
    parent_run_id: str
    rows: list[dict[str, Any]]
    front: list[dict[str, Any]]
    baseline: dict[str, Any]  # the unconstrained reference (continued for the trials' budget when warm-started)
    out: Path
    objectives: tuple[str, str] = OBJECTIVES
    references: list[dict[str, Any]] = field(default_factory=list)  # the unconstrained and rebalanced rows
    limits: dict[str, float] = field(default_factory=dict)  # fairness targets (--max-tv, --max-fd)
    feasible: dict[str, Any] = field(default_factory=dict)  # front.feasibility() of the trials under limits
    plan: dict[str, Any] = field(default_factory=dict)  # the time budget's Plan (empty: no budget)
    wall_s: float = 0.0  # of this call of run_sweep (a resumed sweep: since the resume)
    store: str = ""  # the sweep's folder in the run storage (what --resume and the trials read)
    budget_knobs: list[str] = field(default_factory=list)  # searched keys that change compute or optimiser
    study: str = ""  # the Optuna study's storage URL
    study_states: dict[str, int] = field(default_factory=dict)  # Optuna's trial states at the end: count each


def plan_resources(cfg: Config) -> tuple[int, dict[str, float]]:
    """Concurrent trials and per-worker resources for the connected Ray cluster's nodes
    (``cdd_ray.placement.sweep_resources``)."""
    return sweep_resources(cluster_nodes(), cfg)


def run_unconstrained(base: Config, storage: str, out: Path, uri: str, parent_run_id: str, role: str,
                      steps: int, init_from: str = "", overrides: dict[str, Any] | None = None,
                      store: str | None = None, verbose: bool = False) -> dict[str, Any]:
    """An unconstrained reference run (a child of the sweep, MLflow tag ``role``), its outputs in ``out`` and, when
    ``store`` (a folder of the run storage) is another place, there too; reused from ``store`` when the sweep is
    resumed. ``overrides``: config keys for this run only (e.g. ``optim.balanced`` for the rebalanced one)."""
    store = store or str(out)
    saved = storage_io.read_text(storage_io.join(store, "summary.json"))
    if saved and json.loads(saved).get("role") == role:  # written last: the run is complete
        return json.loads(saved)
    cfg = config_from_dict(base.to_dict())
    cfg.unconstrained = True
    cfg.name = f"{base.name}-{role}"
    cfg.optim.steps = steps
    cfg.optim.init_from = init_from
    if init_from:
        cfg.optim.warmup = min(cfg.optim.warmup, steps // 10)
    apply_overrides(cfg, overrides or {})
    validate(cfg)
    resources = worker_resources(cfg)
    run_id = tracking.start_run(cfg, uri, parent_run_id=parent_run_id, extra_tags={"sweep": base.name, "role": role})
    summary = fit_tracked(lambda: make_trainer(cfg, storage, cfg.name, resources, verbose=verbose,
                                               mlflow={"uri": uri, "run_id": run_id}), cfg.ray.max_failures,
                          uri, run_id, out)
    summary.update(run_id=run_id, role=role)
    if store != str(out):  # a URI storage: the outputs go there too, the driver keeps its copy
        storage_io.upload(out, store)
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
    storage_io.write_text(storage_io.join(store, "summary.json"), json.dumps(summary, indent=2))  # last: complete
    return summary


def live_class_losses(history_file: str | Path, names: list[str], fraction: float = 0.1) -> dict[str, float]:
    """Per-constraint training loss of the *live* model: the mean of ``loss_<name>`` over the last ``fraction``
    of the run's blocks (an unconstrained run records them with ``optim.monitor_constraints``). ``history_file``:
    a local path or one in the run storage."""
    history = json.loads(storage_io.read_text(str(history_file)) or "null")
    if history is None:
        raise ConfigError(f"dual.b_rel: no baseline history at {str(history_file)!r}")
    tail = history[-max(1, int(len(history) * fraction)):]
    missing = [n for n in names if f"loss_{n}" not in tail[-1]]
    if missing:
        raise ConfigError(f"dual.b_rel: the baseline's history {str(history_file)!r} has no live losses for "
                          f"{missing} (it must run with optim.monitor_constraints=true)")
    return {n: sum(h[f"loss_{n}"] for h in tail) / len(tail) for n in names}


def check_limits(limits: dict[str, float], n_samples: int, n_classes: int) -> None:
    """Fairness targets a sweep can show met: in (0, 1), and above what an exactly uniform generator scores with
    the evaluation's ``n_samples`` over ``n_classes`` (its floor), else refused with the samples it would need."""
    for m, x in limits.items():
        if m not in FAIRNESS_METRICS:
            raise ConfigError(f"fairness target {m!r} not allowed; allowed: {', '.join(FAIRNESS_METRICS)}")
        flag = f"--max-{'tv' if m == 'tv_to_uniform' else 'fd'}"
        if not 0 < x < 1:  # both are below 1 for any class shares (fd <= sqrt(1 - 1/k))
            raise ConfigError(f"{flag}: {x:g} must be in (0, 1)")
        floor = FLOORS[m](n_samples, n_classes)
        if x <= floor:
            raise ConfigError(
                f"{flag}: {x:g} is below what {n_samples} samples can show: an exactly uniform generator scores "
                f"{m} {floor:.3f} at eval.n_samples={n_samples} ({n_classes} classes); a target of {x:g} needs "
                f"eval.n_samples >= {samples_needed(m, x, n_classes)}, or a target above {floor:.3f}")


def _searcher(objectives: tuple[str, str], seed: int, limits: dict[str, float], sampler: str,
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


def close_stopped_children(uri: str, parent_run_id: str, status: str = "FAILED") -> None:
    """The sweep's trial runs still RUNNING when it ends get ``status``: KILLED on Ctrl-C (every running trial);
    FAILED after the trials, where only a trial whose process died can have left one (ASHA's stopped trials are
    FINISHED by mark_stopped_early first)."""
    c = tracking.client(uri)
    exp = c.get_run(parent_run_id).info.experiment_id
    for r in c.search_runs([exp], filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}' and "
                                                "attributes.status = 'RUNNING'"):
        tracking.end_run(uri, r.info.run_id, status)


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


def budget_knobs(space: SearchSpace) -> list[str]:
    """The searched keys that change a trial's training compute or optimiser (BUDGET_KNOBS)."""
    return [k for k in space.params if k in BUDGET_KNOBS]


def unequal_budget_note(knobs: list[str], base: Config) -> str:
    values = flatten(base.to_dict())
    keep = ", ".join(f"{k}={values[k]}" for k in knobs if k in values)
    return (f"NOT AT EQUAL BUDGET: the search space searches {', '.join(knobs)}, which change the training compute "
            f"or the optimiser; the references keep the base config's {keep or 'batches'}. Compare the trials with "
            "each other; against the references only in the rows' steps / train_images / lr columns.")


def largest_trial_images(space: SearchSpace, cfg: Config) -> int:
    """Images per primal step of the costliest trial ``space`` allows (objective batch + every constraint's)."""
    k = len(cfg.constraint_names())
    if "optim.batch_ratio" in space.params:
        kind, args = next(iter(space.params["optim.batch_ratio"].items()))
        c = max(1, cfg.optim.batch_size // int(min(args)))
    else:
        c = int(space.max_value("optim.constraint_batch_size", cfg.optim.constraint_batch_size))
    return int(space.max_value("optim.batch_size", cfg.optim.batch_size)) + k * c


def budget_plan(base: Config, space: SearchSpace, pre: dict[str, Any], driver_s: float, used_s: float,
                time_budget_s: float, num_samples: int, warm_start_steps: int, monitored: bool, conc: int) -> Plan:
    """Size the trials from what the baseline measured (cdd_ray.budget)."""
    k = len(base.constraint_names())
    base_images = base.optim.batch_size + (k * base.optim.constraint_batch_size if monitored else 0)
    tp = Throughput.from_baseline(pre, max(driver_s, float(pre.get("wall_s") or 0.0)), base_images)
    steps = warm_start_steps or base.optim.steps
    every = base.ray.report_every
    return plan(time_budget_s, used_s, tp, steps=steps, trials=num_samples,
                min_steps=max(2 * every, steps // 3), trial_images=largest_trial_images(space, base),
                reference_images=base.optim.batch_size,
                references=int(warm_start_steps > 0) + int(not base.is_finetune),
                parallel=conc if base.ray.gpu else 1, cut_steps=warm_start_steps > 0)


def run_sweep(base: Config, space: SearchSpace, num_samples: int, resume: bool = False, seed: int = 0,
              warm_start_steps: int = 0, objectives: tuple[str, str] = OBJECTIVES,
              limits: dict[str, float] | None = None, sampler: str = DEFAULT_SAMPLER,
              time_budget_s: float | None = None, started: float | None = None, verbose: bool = False) -> SweepResult:
    """Baseline, then ``num_samples`` Optuna trials on Ray Tune; returns the front.

    ``warm_start_steps`` > 0: the baseline trains ``optim.steps`` unconstrained steps once; every trial
    starts from its weights and trains ``warm_start_steps`` more (with its constraints). The reference
    point is then the baseline continued unconstrained for the same ``warm_start_steps`` from the same
    weights, so it has had exactly the training budget of every trial.
    A second reference, the rebalanced baseline (unconstrained, objective batches drawn class-balanced), gets
    the same budget and warm start: the obvious rival of dual training.
    ``objectives``: the two metrics Optuna optimises (MAXIMISED ones up, the rest down) and the front is drawn
    in (from OBJECTIVE_METRICS). ``limits``: fairness targets {metric: largest allowed value}; Optuna then
    searches under them and the result names the best trial meeting them (``feasible``). ``sampler``: the Optuna
    sampler (SAMPLERS). ``time_budget_s``: the sweep ends within this many seconds from ``started`` (default: now):
    the baseline measures the machine and ``cdd_ray.budget.plan`` sizes the trials' steps and count (printed
    before the trials start, kept in plan.json so that --resume keeps it, and reported with the front).
    The console shows the references' progress bars, then the trials' table (``cdd_ray.console.SweepTable``);
    ``verbose``: Ray's and Tune's own lines too.
    """
    started = time.time() if started is None else started
    limits = dict(limits or {})
    bad = [o for o in objectives if o not in OBJECTIVE_METRICS]
    if bad or len(objectives) != 2 or objectives[0] == objectives[1]:
        raise ConfigError(f"objectives: {list(objectives)} must be two different metrics from: "
                          f"{', '.join(OBJECTIVE_METRICS)}")
    check_limits(limits, base.eval.n_samples, len(base.data.classes))
    make_sampler(sampler, seed)  # an unknown sampler fails here, before any work
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")  # fid/tv arrive with the final report only
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "5")  # so Tuner.restore does not re-run finished trials
    # Ctrl-C raises KeyboardInterrupt here (Tune's own handler would end the sweep as if it had finished);
    # the sweep state saved every few seconds is what --resume continues from.
    os.environ.setdefault("TUNE_DISABLE_SIGINT_HANDLER", "1")
    if not verbose:  # Tune's legacy console is silent at verbose=0 (the new one still prints its header box)
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    storage = preflight.check_storage(resolve_storage(base.ray.storage))
    # Everything the sweep needs lives in ``store``, in the run storage (a local or shared folder, or a URI):
    # trials on any node and a --resume from any driver find it there. ``sweep_dir`` is the driver's folder of
    # what a user reads (the front, the references' outputs): the store itself when the storage is a folder.
    store = storage_io.join(storage, base.name)
    uri_storage = storage_io.is_uri(storage)
    sweep_dir = Path(store) if not uri_storage else Path("runs").resolve() / base.name
    exists = storage_io.exists(storage_io.join(store, "mlflow_parent_run_id"))
    if exists and not resume:
        raise ConfigError(f"name: a sweep {base.name!r} already exists under {storage!r}; pass --resume or another --name")
    if resume and not exists:
        raise ConfigError(f"--resume: no sweep {base.name!r} under {storage!r}")
    apply_overrides(base, space.fixed)
    validate(base)
    check_this_machine(base, sweep=True)  # before a local Ray starts
    check_source(base.data)
    base = preflight.resolve(base)  # every trial, reference and worker gets the driver's choices
    uri = preflight.check_tracking(tracking.tracking_uri())
    init_ray(base.ray.address, verbose=verbose)
    conc, resources = plan_resources(base)
    parent = mlflow_run_for(storage_io.join(store, "mlflow_parent_run_id"), base, uri, resume,
                            tags={"role": "sweep", "sweep": base.name, "search_space": space.path})
    sweep_dir.mkdir(parents=True, exist_ok=True)
    unequal = budget_knobs(space)
    if unequal:
        print(unequal_budget_note(unequal, base), flush=True)
        tracking.set_tags(uri, parent, {"equal_budget": "false", "budget_knobs_searched": ",".join(unequal)})

    def reference(role: str, steps: int, init_from: str = "", overrides: dict[str, Any] | None = None):
        print(f"{role}: unconstrained, {steps} steps" + (" from the baseline's weights" if init_from else ""),
              flush=True)
        return run_unconstrained(base, storage, sweep_dir / role, uri, parent, role, steps, init_from, overrides,
                                 store=storage_io.join(store, role), verbose=verbose)

    with tracked(uri, parent):
        relative = "dual.b_rel" in space.params and not base.is_finetune
        t_base = time.time()
        pre = reference("baseline", base.optim.steps,
                        overrides={"optim.monitor_constraints": True} if relative else None)
        sweep_plan = {}
        if time_budget_s:
            plan_file = storage_io.join(store, "plan.json")
            saved_plan = storage_io.read_text(plan_file)
            if saved_plan:  # a resumed sweep keeps the plan it started with
                sweep_plan = json.loads(saved_plan)
                print(f"time budget: the interrupted sweep's plan: {sweep_plan['num_trials']} trials of "
                      f"{sweep_plan['trial_steps']} steps. {sweep_plan['cut']}", flush=True)
            else:
                p = budget_plan(base, space, pre, time.time() - t_base, time.time() - started, time_budget_s, num_samples,
                                warm_start_steps, relative, conc)
                sweep_plan = p.to_dict()
                storage_io.write_text(plan_file, json.dumps(sweep_plan, indent=2))
                print(p.describe(), flush=True)
            num_samples = sweep_plan["num_trials"]
            if warm_start_steps > 0:
                warm_start_steps = sweep_plan["trial_steps"]
            tracking.set_tags(uri, parent, {"time_budget_s": str(time_budget_s), "budget_cut": sweep_plan["cut"]})
        trial_base = config_from_dict(base.to_dict())
        if trial_base.ray.report_every == 0:  # ASHA's clock needs reports: about 8 per trial
            trial_base.ray.report_every = max(1, (warm_start_steps or trial_base.optim.steps) // 8)
        baseline = pre
        if warm_start_steps > 0:
            trial_base.optim.init_from = storage_io.join(store, "baseline", "checkpoint")  # workers read it there
            trial_base.optim.steps = warm_start_steps
            trial_base.optim.warmup = min(base.optim.warmup, warm_start_steps // 10)
            baseline = reference("baseline-continued", warm_start_steps, trial_base.optim.init_from)
        references = [baseline]
        if not base.is_finetune:
            # the theory check's q for every trial: the budget-matched baseline's measured class shares
            trial_base.eval.baseline_shares = list(baseline["class_shares"])
            references.append(reference("baseline-rebalanced", trial_base.optim.steps, trial_base.optim.init_from,
                                        overrides={"optim.balanced": True}))
        # dual.b_rel is relative to the baseline's live training loss on each constraint's data (what the
        # constraint bounds), not to its EMA model's evaluation.
        losses = (live_class_losses(storage_io.join(store, "baseline", "history.json"), base.constraint_names())
                  if relative else {})
        sweep_cfg = {
            "name": base.name, "base": trial_base.to_dict(), "param_keys": list(space.params), "storage": storage,
            "outputs": storage_io.join(store, "trials"), "mlflow_uri": uri, "parent_run_id": parent,
            "baseline_losses": losses, "resources": resources, "verbose": verbose,
        }
        trainable = tune.with_resources(run_trial, {"CPU": 0.1})
        study = searcher_study(sweep_dir, store, uri_storage, resume)
        if resume and tune.Tuner.can_restore(storage_io.join(store, "tuner")):
            # the restored Tuner brings its own RunConfig: the console table and run names it started with
            tuner = tune.Tuner.restore(storage_io.join(store, "tuner"), trainable, resume_errored=True)
        else:
            # ASHA's clock is primal steps (time_attr "step"; only the window reports carry ASHA_LOSS). max_t is
            # above any trial's steps: ASHA must never stop a trial at its final report, which would cut off its
            # output collection. One rung at about half the trial, on a multiple of report_every (a report step).
            every = trial_base.ray.report_every
            max_t = int(space.max_value("optim.steps", trial_base.optim.steps)) + 1
            grace = max(every, trial_base.optim.steps // 2 // every * every)
            tuner = tune.Tuner(
                trainable,
                param_space={**to_tune(space), "sweep": sweep_cfg},
                tune_config=tune.TuneConfig(
                    search_alg=_searcher(objectives, seed, limits, sampler, study, base.name),
                    scheduler=ASHAScheduler(time_attr="step", metric=ASHA_LOSS, mode="min", max_t=max_t,
                                            grace_period=grace, reduction_factor=3),
                    num_samples=num_samples, max_concurrent_trials=conc,
                ),
                run_config=tune.RunConfig(name="tuner", storage_path=store, verbose=tune_verbosity(verbose),
                                          callbacks=[SweepTable(list(space.params), trial_base.optim.steps,
                                                                num_samples, conc, objectives),
                                                     TrialRunNames(uri, sweep_cfg["outputs"], list(space.params))]),
            )
        try:
            results = tuner.fit()
        except KeyboardInterrupt:  # the parent is marked KILLED by tracked(); so are its running trials
            close_stopped_children(uri, parent, "KILLED")
            if uri_storage:  # a --resume from any driver continues this study
                storage_io.upload(sweep_dir / "study", storage_io.join(store, "study"))
            raise
        states = study_states(study, base.name)
        rows = trial_rows(results, sweep_cfg["outputs"], list(space.params), objectives)
        mark_stopped_early(uri, rows, sweep_cfg["outputs"])
        close_stopped_children(uri, parent)  # anything else left RUNNING
        refuse_incomparable(rows, references)
        compare_runs(references, rows, store, sweep_cfg["outputs"], objectives)
        front = pareto_front(rows, objectives)
        feasible = feasibility(rows, limits, objectives[0]) if limits else {}
        write_front(sweep_dir / "front", rows, front, references, objectives,
                    (*SWEEP_METRICS, "quality_classes", *BUDGET_COLUMNS))
        if sweep_plan:
            (sweep_dir / "front" / "plan.json").write_text(json.dumps(sweep_plan, indent=2))
        if uri_storage:
            storage_io.upload(sweep_dir / "front", storage_io.join(store, "front"))
        tracking.log_artifacts(uri, parent, sweep_dir / "front")
        tracking.log_artifacts(uri, parent, sweep_dir / "study", "study")
        if uri_storage:
            storage_io.upload(sweep_dir / "study", storage_io.join(store, "study"))
        tracking.log_metrics(uri, parent, {"sweep/trials": len(rows), "sweep/front_size": len(front), **{
            f"{r['role']}/{k}": r[k] for r in references for k in SWEEP_METRICS  # e.g. baseline-continued/fid
            if isinstance(r.get(k), (int, float))}}, 0)
        tracking.set_tags(uri, parent, {"objectives": ",".join(objectives), "sampler": sampler, **{
            f"max_{m}": str(x) for m, x in limits.items()}})
    res = SweepResult(parent_run_id=parent, rows=rows, front=front, baseline=baseline, out=sweep_dir,
                      objectives=objectives, references=references, limits=limits, feasible=feasible,
                      plan=sweep_plan, wall_s=time.time() - started, store=store, budget_knobs=unequal,
                      study=study_url(sweep_dir), study_states=states)
    budget = (f"every trial and {'both references' if len(references) > 1 else 'the reference'} trained "
              f"{trial_base.optim.steps} primal steps" + (
                  f", warm-started from the unconstrained baseline's {base.optim.steps} steps" if warm_start_steps > 0
                  else " from scratch"))
    tracking.set_tags(uri, parent, {"mlflow.note.content": sweep_note(res, sampler, budget)})
    return res


def compare_runs(references: list[dict[str, Any]], rows: list[dict[str, Any]], store: str, outputs: str,
                 objectives: tuple[str, str]) -> None:
    """Every evaluated run that is not refused, as ``cdd_ray.compare`` reads it: its class-mean quality restated
    over the classes all of them have (``quality_classes``), and its ``differences`` to each reference (the
    objectives and the mix-free quality and fairness measures, each with the 95% interval of the difference)."""
    folders = [(r, storage_io.join(store, r["role"])) for r in references]
    folders += [(r, storage_io.join(outputs, str(r["trial_id"]))) for r in rows if r["status"] == "done"]
    runs = [(r, e) for r, folder in folders if not r.get("refused") and (e := compare.load(folder)) is not None]
    classes = compare.common_classes([e for _, e in runs])
    for r, e in runs:
        compare.restate_class_quality(r, e, classes)
    refs = {r["role"]: e for r, e in runs if r.get("role", "trial") != "trial"}
    metrics = tuple(dict.fromkeys(m for m in (*objectives, "precision_class_mean", "fid_class_mean", "tv_excess",
                                              "minority_share") if m in compare.DIFF_METRICS))
    for r, e in runs:
        r["differences"] = compare.differences(e, refs, metrics, classes)


def study_states(url: str, name: str) -> dict[str, int]:
    """How many of the study's trials ended in each Optuna state (COMPLETE, PRUNED, FAIL; RUNNING: never told)."""
    study = optuna.load_study(study_name=name, storage=url)
    states: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        states[t.state.name] = states.get(t.state.name, 0) + 1
    return states


def budget_line(res: SweepResult) -> str:
    """The budget of every printed point, checkable: steps, images through the gradient step, learning rate."""
    def span(rows: list[dict[str, Any]], key: str) -> str:
        vals = sorted({r[key] for r in rows if isinstance(r.get(key), (int, float))})
        return "-" if not vals else f"{vals[0]:g}" if len(vals) == 1 else f"{vals[0]:g}-{vals[-1]:g}"

    done = [r for r in res.rows if r["status"] == "done"]
    line = (f"budget: references {span(res.references, 'steps')} steps at lr {span(res.references, 'lr')} "
            f"({span(res.references, 'train_images')} training images); finished trials {span(done, 'steps')} "
            f"steps at lr {span(done, 'lr')} ({span(done, 'train_images')} images: the objective's batches plus "
            "one batch per constraint)")
    return line + (".\n" + "NOT AT EQUAL BUDGET: the space searches " + ", ".join(res.budget_knobs) + "."
                   if res.budget_knobs else ".")


def sweep_note(res: SweepResult, sampler: str, budget: str) -> str:
    """The sweep parent run's description in MLflow (Markdown): what was searched for, the equal budget, and the
    front with its intervals beside the references (what the job prints)."""
    q, f = res.objectives
    better = {o: direction(o) for o in res.objectives}
    target = (" under " + " and ".join(f"{m} <= {x:g}" for m, x in res.limits.items())) if res.limits else ""
    return "\n\n".join([
        f"**Sweep {res.out.name}**: {len(res.rows)} trials searched by Optuna ({sampler}) on Ray Tune for {q} "
        f"({better[q]} is better) and {f} ({better[f]} is better){target}.",
        f"**Budget**: {budget}.", report(res)])


def mark_stopped_early(uri: str, rows: list[dict[str, Any]], outputs: str) -> None:
    """A trial ASHA stopped ended as the search meant it to: its run is FINISHED with tags ``stopped_early=true``
    and ``stopped_at_step`` (KILLED is for a person's Ctrl-C). Ray ends the trial's process from outside, so the
    run was left RUNNING, or FAILED where the stop landed inside the trial's own clean-up. ``outputs``: the
    trials' folder in the run storage."""
    for r in rows:
        if r["status"] != "stopped early":
            continue
        run_id = storage_io.read_text(storage_io.join(outputs, str(r.get("trial_id")), "mlflow_run_id"))
        if run_id:
            tracking.set_tags(uri, run_id.strip(), {"stopped_early": "true", "stopped_at_step": str(r.get("steps"))})
            tracking.end_run(uri, run_id.strip(), "FINISHED")


def trial_rows(results, outputs: str, param_keys: list[str], objectives: tuple[str, str]) -> list[dict[str, Any]]:
    """One row per trial: a finished trial's summary.json (metrics with their intervals), else what it reported
    before ASHA stopped it. ``outputs``: the trials' folder in the run storage."""
    rows = []
    for number, r in enumerate(results, 1):  # the ResultGrid keeps Tune's order of the trials
        m = r.metrics or {}
        out = storage_io.join(outputs, str(m.get("trial_id", "")))
        info = json.loads(storage_io.read_text(storage_io.join(out, "trial.json")) or "{}")
        summary = json.loads(storage_io.read_text(storage_io.join(out, "summary.json"))) if info else m
        rows.append({"role": "trial", "trial_id": m.get("trial_id"), "number": number,
                     **{k: summary.get(k) for k in SWEEP_METRICS},
                     **{f"{k}_ci": summary[f"{k}_ci"] for k in SWEEP_METRICS if summary.get(f"{k}_ci")},
                     **{k: summary.get(k, m.get("step") if k == "steps" else None) for k in BUDGET_COLUMNS},
                     "fid_features": summary.get("fid_features"), "data_source": summary.get("data_source"),
                     "run_id": info.get("run_id"),
                     "status": "error" if r.error else ("done" if info else "stopped early"),
                     "params": {k: (r.config or {}).get(k) for k in param_keys}})
    return rows


def report(res: SweepResult) -> str:
    """What the jobs print: the front with its intervals and references, the fairness target's answer, where
    everything is."""
    q, f = res.objectives
    done = sum(r["status"] == "done" for r in res.rows)
    lines = [f"Pareto front ({q} {direction(q)} is better, {f} {direction(f)} is better; {len(res.rows)} trials, "
             f"{done} finished, {len(res.front)} on the front). Values with 95% bootstrap intervals:",
             format_front(res.front, res.references, res.objectives, (*SWEEP_METRICS, "quality_classes"))]
    if any(r.get("differences") for r in [*res.references, *res.front]):
        lines += ["Differences to the references (point - reference, with the 95% interval of the difference: paired "
                  "over the shared sampling noise for shares and precision, FIDs from independent bootstraps; "
                  "'better' / 'worse' where it excludes 0, otherwise these samples show no difference; all "
                  "metrics in front/differences.csv):",
                  format_differences(res.front, res.references, res.objectives)]
    floor = next((r.get("tv_floor") for r in res.references if r.get("tv_floor") is not None), None)
    if floor is not None:
        lines.append(f"tv_floor {floor:.3f}: the tv_to_uniform of an exactly uniform generator with this many samples "
                     "(tv_excess = tv_to_uniform - tv_floor).")
    classes = next((r["quality_classes"] for r in [*res.references, *res.rows] if r.get("quality_classes") is not None),
                   None)
    if classes is not None:
        lines.append(f"fid_class_mean and precision_class_mean average the same classes for every point: "
                     f"{classes or 'none'} (the classes every evaluated run generated enough samples of).")
    refused = [r for r in res.rows if r.get("refused")]
    if refused:
        lines.append("refused (evaluated on other data or features than the references, kept off the front): "
                     + ", ".join(f"{name_of(r)} ({r['refused']})" for r in refused))
    if res.limits:
        lines.append(format_feasibility(res.feasible, res.limits, q))
    lines.append(budget_line(res))
    if res.study:
        lines.append("Optuna study: " + ", ".join(f"{n} {k}" for k, n in sorted(res.study_states.items()))
                     + f" trials; see it with: optuna-dashboard {res.study}")
    if res.plan:
        pl = res.plan
        lines.append(f"time budget {pl['budget_s'] / 60:.0f} min, took {res.wall_s / 60:.1f} min: {pl['num_trials']} trials "
                     f"and the references at {pl['trial_steps']} steps (asked: {pl['requested_trials']} x "
                     f"{pl['requested_steps']}); {pl['cut']}")
    lines += [f"sweep folder: {res.out}  (front/pareto.csv, front/differences.csv, front/tradeoff.png, "
              "front/best_configs.json)"
              + (f"; the sweep's state and outputs: {res.store}" if res.store and res.store != str(res.out) else ""),
              f"MLflow parent run: {res.parent_run_id}"]
    return "\n".join(lines)
