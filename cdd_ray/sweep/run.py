"""``run_sweep``: one sweep, from its checks to its published front.

Flow: check the request and lay out the storage; with a time budget, the plan of the whole sweep, from a
calibration on a worker (``cdd_ray.sweep.plan``); an MLflow parent run; the unconstrained baseline (its per-class
losses anchor ``dual.b_rel``) and the plan re-checked with what it measured; the references at the
trials' budget (the baseline continued, the rebalanced baseline); the Tuner (``cdd_ray.sweep.search``) running the
trials (``cdd_ray.sweep.trial``); then the rows, the front and its differences, published to the sweep folder and
the parent run (``cdd_ray.sweep.results``)."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cdd_ray import preflight, storage as storage_io, tracking
from cdd_ray.cluster.placement import check_this_machine, cluster_nodes, sweep_resources
from cdd_ray.cluster.session import init_ray
from cdd_ray.config import Config, ConfigError, apply_overrides, check, config_from_dict
from cdd_ray.data import check_source
from cdd_ray.front import check_request as front_request, feasibility, pareto_front, refuse_incomparable
from cdd_ray.metrics import OBJECTIVES
from cdd_ray.runner import mlflow_run_for, tracked
from cdd_ray.samplers import DEFAULT_SAMPLER, make_sampler
from cdd_ray.verdict import verdict_rows
from cdd_ray.sweep import confirm
from cdd_ray.sweep.references import live_class_losses, run_child, run_unconstrained
from cdd_ray.sweep.results import (SweepResult, close_stopped_children, compare_runs, diff_metrics, mark_stopped_early,
                                   publish, sweep_note, trial_rows)
from cdd_ray.sweep.search import make_tuner, searcher_study, study_states, study_url
from cdd_ray.sweep.plan import apply_plan, first_plan, recheck, time_left
from cdd_ray.sweep.space import SearchSpace, budget_knobs, unequal_budget_note


def plan_resources(cfg: Config) -> tuple[int, dict[str, float]]:
    """Concurrent trials and per-worker resources for the connected Ray cluster's nodes
    (``cdd_ray.cluster.placement.sweep_resources``)."""
    return sweep_resources(cluster_nodes(), cfg)


@dataclass
class Place:
    """Where a sweep lives. Everything it needs is in ``store``, in the run storage (a local or shared folder, or a
    URI): trials on any node and a --resume from any driver find it there. ``sweep_dir`` is the driver's folder of
    what a user reads (the front, the references' outputs): the store itself when the storage is a folder."""
    storage: str
    store: str
    sweep_dir: Path
    uri_storage: bool


def check_request(base: Config, objectives: tuple[str, str], limits: dict[str, float], sampler: str, seed: int,
                  overfitting: str, confirm_seeds: int = 0) -> None:
    """The sweep's own arguments, refused before any work: the front's (``cdd_ray.front.check_request``, the
    confirmation's seeds among them) and the sampler."""
    front_request(objectives, limits, overfitting, base.eval.n_samples, len(base.data.classes), confirm_seeds)
    make_sampler(sampler, seed)  # an unknown sampler fails here


def quiet_tune(verbose: bool) -> None:
    """Ray Tune's process-wide settings for a sweep (environment variables it reads when the Tuner starts)."""
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")  # fid/tv arrive with the final report only
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "5")  # so Tuner.restore does not re-run finished trials
    # Ctrl-C raises KeyboardInterrupt here (Tune's own handler would end the sweep as if it had finished);
    # the sweep state saved every few seconds is what --resume continues from.
    os.environ.setdefault("TUNE_DISABLE_SIGINT_HANDLER", "1")
    if not verbose:  # Tune's legacy console is silent at verbose=0 (the new one still prints its header box)
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")


def place(base: Config, resume: bool) -> Place:
    """The sweep's storage, checked writable; a sweep of that name must exist for --resume and not without it."""
    storage = preflight.check_storage(preflight.resolve_storage(base.ray.storage))
    store = storage_io.join(storage, base.name)
    uri_storage = storage_io.is_uri(storage)
    sweep_dir = Path(store) if not uri_storage else Path("runs").resolve() / base.name
    exists = storage_io.exists(storage_io.join(store, "mlflow_parent_run_id"))
    if exists and not resume:
        raise ConfigError(f"name: a sweep {base.name!r} already exists under {storage!r}; pass --resume or another "
                          "--name")
    if resume and not exists:
        raise ConfigError(f"--resume: no sweep {base.name!r} under {storage!r}")
    return Place(storage, store, sweep_dir, uri_storage)


def resolved_base(base: Config, space: SearchSpace) -> Config:
    """A copy of ``base`` with the space's fixed keys, checked against this machine and its data, and every "auto"
    decided on the driver (``cdd_ray.preflight``): every trial, reference and worker gets these choices."""
    base = config_from_dict(base.to_dict())
    apply_overrides(base, space.fixed)
    check(base)  # the fixed keys may name files
    check_this_machine(base, sweep=True)  # before a local Ray starts
    check_source(base.data)
    return preflight.resolve(base)


def trials_base(base: Config, warm_start_steps: int, store: str) -> Config:
    """The config every trial starts from: reports often enough for ASHA's clock (about 8 per trial) and, when
    warm-started, the baseline's weights and ``warm_start_steps`` steps."""
    trial_base = config_from_dict(base.to_dict())
    if trial_base.ray.report_every == 0:
        trial_base.ray.report_every = max(1, (warm_start_steps or trial_base.optim.steps) // 8)
    if warm_start_steps > 0:
        trial_base.optim.init_from = storage_io.join(store, "baseline", "checkpoint")  # workers read it there
        trial_base.optim.steps = warm_start_steps
        trial_base.optim.warmup = min(base.optim.warmup, warm_start_steps // 10)
    return trial_base


def confirm_front(res: SweepResult, where: Place, uri: str, outputs: str, left: tuple[float, float] | None,
                  verbose: bool) -> None:
    """``res.confirm_seeds`` further training seeds of the references and the front (``cdd_ray.sweep.confirm``;
    ``left``: (seconds per run, seconds left) under a time budget), then the confirmed points, their front and the
    verdict in ``res``."""
    seeds = res.confirm_seeds
    refs, res.confirm_left_out = confirm.comparable(res.references, where.store, outputs)
    targets = confirm.choose(res.front, refs, seeds, *(left or (None, None)))

    def run(make_config, out: Path, tags: dict[str, str], store: str) -> dict[str, Any]:
        return run_child(make_config, where.storage, out, uri, res.parent_run_id, tags, store, verbose)

    res.confirm_left_out += confirm.run_confirmations(targets, seeds, where.store, outputs, where.sweep_dir,
                                                      res.out.name, run)
    runs = confirm.seed_runs(targets, seeds, where.store, outputs)
    res.confirmed = confirm.restate(targets, runs, diff_metrics(res.objectives))
    res.confirmed_front = confirm.confirmed_front(res.confirmed, res.objectives)
    res.verdict = verdict_rows(res.confirmed, res.confirmed_front, res.verdict_metrics)


def run_sweep(base: Config, space: SearchSpace, num_samples: int, resume: bool = False, seed: int = 0,
              warm_start_steps: int = 0, objectives: tuple[str, str] = OBJECTIVES,
              limits: dict[str, float] | None = None, sampler: str = DEFAULT_SAMPLER,
              time_budget_s: float | None = None, started: float | None = None, verbose: bool = False,
              overfitting: str = "copy_rate", confirm_seeds: int = 0) -> SweepResult:
    """Baseline, then ``num_samples`` Optuna trials on Ray Tune; returns the front. ``base`` is not changed.

    ``warm_start_steps`` > 0: the baseline trains ``optim.steps`` unconstrained steps once; every trial
    starts from its weights and trains ``warm_start_steps`` more (with its constraints). The reference
    point is then the baseline continued unconstrained for the same ``warm_start_steps`` from the same
    weights, so it has had exactly the training budget of every trial.
    A second reference, the rebalanced baseline (unconstrained, objective batches drawn class-balanced), gets
    the same budget and warm start: the obvious rival of dual training.
    ``objectives``: the two metrics Optuna optimises (``cdd_ray.metrics.MAXIMISED`` ones up, the rest down) and the
    front is drawn in (from OBJECTIVE_METRICS). ``limits``: fairness targets {metric: largest allowed value}; Optuna
    then searches under them and the result names the best trial meeting them (``feasible``). ``sampler``: the
    Optuna sampler (SAMPLERS). ``time_budget_s``: the sweep ends within this many seconds from ``started``
    (default: now): a calibration measures the machine and ``cdd_ray.budget.plan`` sizes the baseline's and the
    trials' steps, the trials' count and the evaluation's samples (printed before the baseline starts; a budget the
    smallest sweep misses is refused then), re-checked after the baseline; kept in plan.json so that --resume
    keeps it, and reported with the front. ``overfitting`` (OVERFITTING_METRICS): the over-fitting measure shown
    beside the objectives (the printed differences, tradeoff.png's second panel). ``confirm_seeds`` > 0: the
    references and the front re-trained with that many further training seeds, restated over their seeds with a
    verdict against each reference (``cdd_ray.sweep.confirm``; under a time budget the plan holds them). The
    console shows the
    references' progress bars, then the trials' table (``cdd_ray.sweep.table.SweepTable``); ``verbose``: Ray's and
    Tune's own lines too.
    """
    started = time.time() if started is None else started
    limits = dict(limits or {})
    check_request(base, objectives, limits, sampler, seed, overfitting, confirm_seeds)
    quiet_tune(verbose)
    where = place(base, resume)
    base = resolved_base(base, space)
    uri = preflight.check_tracking(tracking.tracking_uri())
    init_ray(base.ray.address, verbose=verbose)
    conc, resources = plan_resources(base)
    relative = "dual.b_rel" in space.params and not base.is_finetune
    monitored = {"optim.monitor_constraints": True} if relative else None  # the baseline records their losses
    sweep_plan = {}
    if time_budget_s:  # before anything is written: a budget that cannot fit is refused here
        sweep_plan = first_plan(base, space, where.store, time_budget_s, started, num_samples, warm_start_steps,
                                monitored, limits, conc if base.ray.gpu else 1, resume, confirm_seeds)
        apply_plan(base, sweep_plan)
    parent = mlflow_run_for(storage_io.join(where.store, "mlflow_parent_run_id"), base, uri, resume,
                            tags={"role": "sweep", "sweep": base.name, "search_space": space.path})
    where.sweep_dir.mkdir(parents=True, exist_ok=True)
    unequal = budget_knobs(space)
    if unequal:
        print(unequal_budget_note(unequal, base), flush=True)
        tracking.set_tags(uri, parent, {"equal_budget": "false", "budget_knobs_searched": ",".join(unequal)})

    def reference(role: str, steps: int, init_from: str = "", overrides: dict[str, Any] | None = None):
        print(f"{role}: unconstrained, {steps} steps" + (" from the baseline's weights" if init_from else ""),
              flush=True)
        return run_unconstrained(base, where.storage, where.sweep_dir / role, uri, parent, role, steps, init_from,
                                 overrides, store=storage_io.join(where.store, role), verbose=verbose)

    with tracked(uri, parent):
        t_base = time.time()
        pre = reference("baseline", base.optim.steps, overrides=monitored)
        if time_budget_s:
            sweep_plan = recheck(sweep_plan, where.store, pre, time.time() - t_base, time.time() - started,
                                 warm_start_steps > 0)
            num_samples = sweep_plan["num_trials"]
            if warm_start_steps > 0:
                warm_start_steps = sweep_plan["trial_steps"]
            tracking.set_tags(uri, parent, {"time_budget_s": str(time_budget_s), "budget_cut": sweep_plan["cut"]})
        dropped = bool(confirm_seeds) and (sweep_plan.get("shape") or {}).get("confirm_points") == 0
        confirm_seeds = 0 if dropped else confirm_seeds  # the budget took them: said in the plan and the report
        trial_base = trials_base(base, warm_start_steps, where.store)
        baseline = pre
        if warm_start_steps > 0:
            baseline = reference("baseline-continued", warm_start_steps, trial_base.optim.init_from)
        references = [baseline]
        if not base.is_finetune:
            # the theory check's q for every trial: the budget-matched baseline's measured class shares
            trial_base.eval.baseline_shares = list(baseline["class_shares"])
            references.append(reference("baseline-rebalanced", trial_base.optim.steps, trial_base.optim.init_from,
                                        overrides={"optim.balanced": True}))
        # dual.b_rel is relative to the baseline's live training loss on each constraint's data (what the
        # constraint bounds), not to its EMA model's evaluation.
        losses = (live_class_losses(storage_io.join(where.store, "baseline", "history.json"),
                                    base.constraint_names()) if relative else {})
        sweep_cfg = {
            "name": base.name, "base": trial_base.to_dict(), "param_keys": list(space.params),
            "storage": where.storage, "outputs": storage_io.join(where.store, "trials"), "mlflow_uri": uri,
            "parent_run_id": parent, "baseline_losses": losses, "resources": resources, "verbose": verbose,
        }
        study = searcher_study(where.sweep_dir, where.store, where.uri_storage, resume)
        tuner = make_tuner(space, trial_base, sweep_cfg, where.store, resume, objectives, seed, limits, sampler,
                           study, num_samples, conc, verbose)
        try:
            results = tuner.fit()
        except KeyboardInterrupt:  # the parent is marked KILLED by tracked(); so are its running trials
            close_stopped_children(uri, parent, "KILLED")
            if where.uri_storage:  # a --resume from any driver continues this study
                storage_io.upload(where.sweep_dir / "study", storage_io.join(where.store, "study"))
            raise
        states = study_states(study, base.name)
        rows = trial_rows(results, sweep_cfg["outputs"], list(space.params), objectives)
        mark_stopped_early(uri, rows, sweep_cfg["outputs"])
        close_stopped_children(uri, parent)  # anything else left RUNNING
        refuse_incomparable(rows, references)
        compare_runs(references, rows, where.store, sweep_cfg["outputs"], objectives)
        front = pareto_front(rows, objectives)
        res = SweepResult(parent_run_id=parent, rows=rows, front=front, baseline=baseline, out=where.sweep_dir,
                          objectives=objectives, references=references, overfitting=overfitting, limits=limits,
                          feasible=feasibility(rows, limits, objectives[0]) if limits else {}, plan=sweep_plan,
                          store=where.store, budget_knobs=unequal, study=study_url(where.sweep_dir),
                          study_states=states, confirm_seeds=confirm_seeds, confirm_dropped=dropped)
        publish(uri, res, where.store if where.uri_storage else "", sampler)  # the front, whatever comes next
        if confirm_seeds:
            confirm_front(res, where, uri, sweep_cfg["outputs"], time_left(sweep_plan, started), verbose)
            publish(uri, res, where.store if where.uri_storage else "", sampler)
    res.wall_s = time.time() - started
    budget = (f"every trial and {'both references' if len(references) > 1 else 'the reference'} trained "
              f"{trial_base.optim.steps} primal steps" + (
                  f", warm-started from the unconstrained baseline's {base.optim.steps} steps" if warm_start_steps > 0
                  else " from scratch"))
    tracking.set_tags(uri, parent, {"mlflow.note.content": sweep_note(res, sampler, budget)})
    return res
