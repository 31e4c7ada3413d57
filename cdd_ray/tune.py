"""Ray Tune + Optuna sweeps: each trial fits a TorchTrainer; the front is (quality FID, tv_to_uniform).

Flow of one sweep (``run_sweep``):
1. an MLflow parent run for the sweep;
2. the unconstrained baseline under the same budget (a child run; its per-class losses anchor the
   relative thresholds ``dual.b_rel`` of plain-constraint trials);
3. the Tuner: a function trainable per trial that builds and fits a TorchTrainer (Ray Train V2) and
   reports through ``TuneReportCallback``; OptunaSearch minimises a quality FID and tv_to_uniform together,
   ASHA stops trials whose ``loss_objective`` lags (see README);
4. the Pareto front (pareto.csv, trade-off PNG, best config per objective) logged to the parent run.
"""

from __future__ import annotations

import csv
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cdd_ray import tracking
from cdd_ray.config import Config, ConfigError, allowed_keys, apply_overrides, config_from_dict, flatten, validate

# The quality objective. fid_data (default) compares samples with held-out images in the training data's
# class mix: fidelity to the data, which fairness constraints trade away, so the front shows that price.
# fid compares with a class-balanced reference: it improves with fairness too, so the two objectives
# mostly agree and the front collapses to few points (measured: 1 point in an 8-trial sweep).
QUALITY_METRICS = ("fid_data", "fid")
FAIRNESS_METRIC = "tv_to_uniform"
OBJECTIVES = ("fid_data", FAIRNESS_METRIC)  # both minimised
# Fine-tuning's front: learning the new data (held-out loss on new-class images the model never saw)
# vs forgetting the old classes (1 - old-class share / the pre-trained model's old-class share).
FINETUNE_OBJECTIVES = ("heldout_loss_new", "forgetting")
# Every metric a sweep may minimise; each row of the front carries all of them that the trials report.
SWEEP_METRICS = (*QUALITY_METRICS, FAIRNESS_METRIC, "minority_share", "heldout_loss_new", "forgetting",
                 "new_share", "old_share", "old_tv_to_pretrained", "distance_to_pretrained")
MINIMISABLE = (*QUALITY_METRICS, FAIRNESS_METRIC, "heldout_loss_new", "forgetting", "old_tv_to_pretrained",
               "distance_to_pretrained")
# ASHA compares trials on the mean denoising loss over the objective and every constraint dataset, each
# weighted alike: it prunes trials that learn slowly or diverge (too large lr or eta) without favouring
# trials that give the constraints less weight, as the objective loss alone would.
ASHA_METRIC = "loss_mean"
DERIVED_KEYS = ("dual.b_rel", "optim.batch_ratio")
DISTRIBUTIONS = ("choice", "uniform", "loguniform", "randint")


@dataclass
class SearchSpace:
    params: dict[str, dict[str, Any]]
    fixed: dict[str, Any] = field(default_factory=dict)
    path: str = ""

    def without(self, *keys: str) -> "SearchSpace":
        """The same space with ``keys`` no longer searched (e.g. optim.steps for a smoke run)."""
        return SearchSpace({k: v for k, v in self.params.items() if k not in keys}, dict(self.fixed), self.path)

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


# ---------------------------------------------------------------- Pareto front


def pareto_front(rows: list[dict[str, Any]], objectives: tuple[str, ...] = OBJECTIVES) -> list[dict[str, Any]]:
    """Rows not dominated in ``objectives`` (all minimised); rows with a missing/NaN objective are skipped."""
    ok = [r for r in rows if all(isinstance(r.get(o), (int, float)) and math.isfinite(r[o]) for o in objectives)]

    def dominates(a: dict, b: dict) -> bool:
        return all(a[o] <= b[o] for o in objectives) and any(a[o] < b[o] for o in objectives)

    front = [r for r in ok if not any(dominates(o, r) for o in ok if o is not r)]
    return sorted(front, key=lambda r: r[objectives[0]])


def write_front(out: Path, rows: list[dict[str, Any]], front: list[dict[str, Any]], baseline: dict[str, Any],
                objectives: tuple[str, str] = OBJECTIVES) -> dict[str, Path]:
    """pareto.csv, trials.csv, tradeoff.png and best_configs.json in ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    q, fair = objectives
    cols = ["trial_id", *objectives, *(m for m in SWEEP_METRICS if m not in objectives and any(
        r.get(m) is not None for r in rows)), "run_id", "status"] + sorted(
        {k for r in rows for k in r.get("params", {})})
    for name, data in (("pareto.csv", front), ("trials.csv", rows)):
        with open(out / name, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(cols)
            for r in data:
                w.writerow([r.get(c, r.get("params", {}).get(c, "")) for c in cols])
    fig, ax = plt.subplots(figsize=(6, 4))
    ok = [r for r in rows if all(isinstance(r.get(o), (int, float)) for o in objectives)]
    ax.scatter([r[q] for r in ok], [r[fair] for r in ok], c="0.6", label="trials")
    ax.plot([r[q] for r in front], [r[fair] for r in front], "o-", c="C0", label="Pareto front")
    if baseline and baseline.get(q) is not None:
        ax.scatter([baseline[q]], [baseline[fair]], marker="*", s=200, c="C3", label="unconstrained baseline")
    ax.set_xlabel(AXIS_LABELS.get(q, q).format(features=baseline.get("fid_features", "")))
    ax.set_ylabel(AXIS_LABELS.get(fair, fair))
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "tradeoff.png", dpi=100)
    plt.close(fig)
    best = {o: min(ok, key=lambda r: r[o]) for o in objectives} if ok else {}
    (out / "best_configs.json").write_text(json.dumps(
        {o: {"trial_id": r["trial_id"], o: r[o], "params": r.get("params", {}), "run_id": r.get("run_id")}
         for o, r in best.items()}, indent=2, default=str))
    return {n: out / n for n in ("pareto.csv", "trials.csv", "tradeoff.png", "best_configs.json")}


def format_front(front: list[dict[str, Any]], baseline: dict[str, Any],
                 objectives: tuple[str, str] = OBJECTIVES) -> str:
    """Markdown table: the baseline, then the front; the objectives first, then the other reported metrics."""
    cols = [*objectives, *(m for m in SWEEP_METRICS if m not in objectives and any(
        r.get(m) is not None for r in [baseline, *front]))]

    def row(name: str, r: dict[str, Any], params: str) -> str:
        return "| " + " | ".join([name, *(_num(r.get(c), 2 if c.startswith("fid") else 3) for c in cols), params]) + " |"

    lines = ["| " + " | ".join(["trial", *cols, "params"]) + " |", "|" + " --- |" * (len(cols) + 2)]
    if baseline:
        lines.append(row("baseline (unconstrained)", baseline, ""))
    for r in front:
        lines.append(row(r["trial_id"], r, ", ".join(f"{k}={_fmt(v)}" for k, v in sorted(r.get("params", {}).items()))))
    return "\n".join(lines)


AXIS_LABELS = {
    "fid_data": "fid_data: FID vs held-out data in the training class mix ({features} features; lower is better)",
    "fid": "fid: FID vs a class-balanced reference ({features} features; lower is better)",
    "tv_to_uniform": "TV distance to uniform classes (lower is fairer)",
    "heldout_loss_new": "held-out denoising loss on the new classes (lower: learnt them)",
    "forgetting": "forgetting: 1 - old-class share / pre-trained model's (lower: kept them)",
}


def _num(v: Any, digits: int = 2) -> str:
    return f"{v:.{digits}f}" if isinstance(v, (int, float)) else "-"


def _fmt(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


# ---------------------------------------------------------------- the trial


def run_trial(config: dict[str, Any]) -> None:
    """Tune function trainable: one Ray Train fit with the trial's params, its own MLflow child run."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from cdd_ray.runner import collect_outputs, finish_tracking, make_trainer, tracked

    sweep = config["sweep"]
    params = {k: config[k] for k in sweep["param_keys"]}
    cfg = trial_config(sweep["base"], params, sweep.get("baseline_losses"))
    trial_id = ray.tune.get_context().get_trial_id()
    cfg.name = f"{sweep['name']}-{trial_id}"
    uri = sweep["mlflow_uri"]
    out = Path(sweep["outputs"]) / trial_id
    if (out / "trial.json").exists():  # finished before the sweep was interrupted: report, do not train again
        summary = json.loads((out / "summary.json").read_text())
        ray.tune.report({k: v for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
        return
    id_file = out / "mlflow_run_id"
    if id_file.exists():  # a trial restarted by a resumed sweep continues its own run
        run_id = id_file.read_text().strip()
        tracking.client(uri).update_run(run_id, status="RUNNING")
    else:
        run_id = tracking.start_run(cfg, uri, parent_run_id=sweep["parent_run_id"],
                                    extra_tags={"ray_trial_id": trial_id, "sweep": sweep["name"], "role": "trial"})
        out.mkdir(parents=True, exist_ok=True)
        id_file.write_text(run_id)
    with tracked(uri, run_id):
        trainer = make_trainer(cfg, sweep["storage"], cfg.name, sweep["resources"], callbacks=[TuneReportCallback()],
                               mlflow={"uri": uri, "run_id": run_id})
        result = trainer.fit()
        if result.error is not None:
            raise result.error
        summary = collect_outputs(result.checkpoint, out)
        finish_tracking(uri, run_id, out, summary)
        (out / "trial.json").write_text(json.dumps({"trial_id": trial_id, "run_id": run_id, "params": params}))


# ---------------------------------------------------------------- the sweep


@dataclass
class SweepResult:
    parent_run_id: str
    rows: list[dict[str, Any]]
    front: list[dict[str, Any]]
    baseline: dict[str, Any]
    out: Path
    objectives: tuple[str, str] = OBJECTIVES


def plan_resources(cfg: Config) -> tuple[int, dict[str, float]]:
    """Concurrent trials and per-worker resources for the connected Ray cluster (see ``concurrency``)."""
    import ray

    total = ray.cluster_resources()
    return concurrency(float(total.get("CPU", 0)), float(total.get("GPU", 0)), cfg)


def concurrency(cpus: float, gpus: float, cfg: Config) -> tuple[int, dict[str, float]]:
    """Concurrent trials and per-worker resources: every trial's ``ray.workers`` must fit at once.

    GPU trials: one GPU per worker, so ``gpus // workers`` trials, the CPUs shared among their workers.
    CPU trials: ``cpus // workers`` trials; each trial's driver holds 0.1 CPU and its workers share the rest
    (a whole CPU per worker at least 0.5: Ray Train deadlocks when the trial drivers take it all).
    """
    w, fixed = cfg.ray.workers, cfg.ray.cpus_per_worker
    if fixed and w * fixed + 0.1 > cpus:
        raise ConfigError(f"ray.workers={w} x ray.cpus_per_worker={fixed:g} + 0.1 for the trial does not fit the "
                          f"cluster's {cpus:g} CPUs")
    if cfg.ray.gpu:
        if gpus < w:
            raise ConfigError(f"ray.workers={w} with ray.gpu=true needs {w} GPUs; the cluster has {gpus:g}")
        conc = int(gpus // w)
        if fixed:
            return min(conc, int(cpus // (w * fixed + 0.1))), {"CPU": fixed, "GPU": 1.0}
        return conc, {"CPU": max(1.0, (cpus - 0.1 * conc) / (conc * w)), "GPU": 1.0}
    if fixed:
        return int(cpus // (w * fixed + 0.1)), {"CPU": fixed}
    conc = max(1, int(cpus // w))
    per_cpu = (cpus - 0.1 * conc) / (conc * w)
    if per_cpu < 0.5:
        raise ConfigError(f"ray.workers={w} does not fit the cluster's {cpus:g} CPUs (a CPU worker needs >= 0.5)")
    return conc, {"CPU": per_cpu}


def run_unconstrained(base: Config, storage: str, out: Path, uri: str, parent_run_id: str, role: str,
                      steps: int, init_from: str = "") -> dict[str, Any]:
    """An unconstrained reference run (a child of the sweep); reused when the sweep is resumed."""
    from cdd_ray.runner import collect_outputs, finish_tracking, fit, make_trainer, tracked, worker_resources

    if (out / "summary.json").exists():
        return json.loads((out / "summary.json").read_text())
    cfg = config_from_dict(base.to_dict())
    cfg.unconstrained = True
    cfg.name = f"{base.name}-{role}"
    cfg.optim.steps = steps
    cfg.optim.init_from = init_from
    if init_from:
        cfg.optim.warmup = min(cfg.optim.warmup, steps // 10)
    run_id = tracking.start_run(cfg, uri, parent_run_id=parent_run_id, extra_tags={"sweep": base.name, "role": role})
    with tracked(uri, run_id):
        result = fit(make_trainer(cfg, storage, cfg.name, worker_resources(cfg),
                                  mlflow={"uri": uri, "run_id": run_id}))
        if result.error is not None:
            raise result.error
        summary = collect_outputs(result.checkpoint, out)
        finish_tracking(uri, run_id, out, summary)
    summary["run_id"] = run_id
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def close_stopped_children(uri: str, parent_run_id: str) -> None:
    """Trials stopped by ASHA are ended from outside their process: mark their runs KILLED, not RUNNING."""
    c = tracking.client(uri)
    exp = c.get_run(parent_run_id).info.experiment_id
    for r in c.search_runs([exp], filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}' and "
                                                "attributes.status = 'RUNNING'"):
        tracking.end_run(uri, r.info.run_id, "KILLED")


def run_sweep(base: Config, space: SearchSpace, num_samples: int, resume: bool = False, seed: int = 0,
              warm_start_steps: int = 0, objectives: tuple[str, str] = OBJECTIVES) -> SweepResult:
    """Baseline, then ``num_samples`` Optuna trials on Ray Tune; returns the front.

    ``warm_start_steps`` > 0: the baseline trains ``optim.steps`` unconstrained steps once; every trial
    starts from its weights and trains ``warm_start_steps`` more (with its constraints). The reference
    point is then the baseline continued unconstrained for the same ``warm_start_steps`` from the same
    weights, so it has had exactly the training budget of every trial.
    ``objectives``: the two metrics Optuna minimises and the front is drawn in (from MINIMISABLE).
    """
    bad = [o for o in objectives if o not in MINIMISABLE]
    if bad or len(objectives) != 2 or objectives[0] == objectives[1]:
        raise ConfigError(f"objectives: {list(objectives)} must be two different metrics from: {', '.join(MINIMISABLE)}")
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    from cdd_ray.runner import init_ray, resolve_storage

    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")  # fid/tv arrive with the final report only
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "5")  # so Tuner.restore does not re-run finished trials
    # Ctrl-C raises KeyboardInterrupt here (Tune's own handler would end the sweep as if it had finished);
    # the sweep state saved every few seconds is what --resume continues from.
    os.environ.setdefault("TUNE_DISABLE_SIGINT_HANDLER", "1")
    storage = resolve_storage(base.ray.storage)
    sweep_dir = Path(storage) / base.name if "://" not in storage else Path("runs") / base.name
    exists = (sweep_dir / "mlflow_parent_run_id").exists()
    if exists and not resume:
        raise ConfigError(f"name: a sweep {base.name!r} already exists under {storage!r}; pass --resume or another --name")
    if resume and not exists:
        raise ConfigError(f"--resume: no sweep {base.name!r} under {storage!r}")
    apply_overrides(base, space.fixed)
    validate(base)
    uri = tracking.tracking_uri()
    init_ray(base.ray.address)
    conc, resources = plan_resources(base)
    parent_file = sweep_dir / "mlflow_parent_run_id"
    if resume and parent_file.exists():
        parent = parent_file.read_text().strip()
        tracking.client(uri).update_run(parent, status="RUNNING")
    else:
        parent = tracking.start_run(base, uri, extra_tags={"role": "sweep", "sweep": base.name,
                                                           "search_space": space.path})
        sweep_dir.mkdir(parents=True, exist_ok=True)
        parent_file.write_text(parent)
    from cdd_ray.runner import tracked

    with tracked(uri, parent):
        pre = run_unconstrained(base, storage, sweep_dir / "baseline", uri, parent, "baseline", base.optim.steps)
        trial_base = config_from_dict(base.to_dict())
        baseline = pre
        if warm_start_steps > 0:
            trial_base.optim.init_from = str(sweep_dir / "baseline" / "checkpoint")
            trial_base.optim.steps = warm_start_steps
            trial_base.optim.warmup = min(base.optim.warmup, warm_start_steps // 10)
            baseline = run_unconstrained(base, storage, sweep_dir / "baseline-continued", uri, parent,
                                         "baseline-continued", warm_start_steps, trial_base.optim.init_from)
        losses = pre.get("minority_losses") or {}
        sweep_cfg = {
            "name": base.name, "base": trial_base.to_dict(), "param_keys": list(space.params), "storage": storage,
            "outputs": str(sweep_dir / "trials"), "mlflow_uri": uri, "parent_run_id": parent,
            "baseline_losses": losses, "resources": resources,
        }
        trainable = tune.with_resources(run_trial, {"CPU": 0.1})
        if resume and tune.Tuner.can_restore(str(sweep_dir / "tuner")):
            tuner = tune.Tuner.restore(str(sweep_dir / "tuner"), trainable, resume_errored=True)
        else:
            # Above any trial's number of reports (at most steps / checkpoint_every + the final one): ASHA must
            # never stop a trial at its final report, which would cut off its output collection.
            max_t = int(space.max_value("optim.steps", trial_base.optim.steps)) // base.ray.checkpoint_every + 2
            tuner = tune.Tuner(
                trainable,
                param_space={**to_tune(space), "sweep": sweep_cfg},
                tune_config=tune.TuneConfig(
                    search_alg=OptunaSearch(metric=list(objectives), mode=["min", "min"], seed=seed),
                    scheduler=ASHAScheduler(metric=ASHA_METRIC, mode="min", max_t=max_t,
                                            grace_period=max(1, max_t // 2), reduction_factor=3),
                    num_samples=num_samples, max_concurrent_trials=conc,
                ),
                run_config=tune.RunConfig(name="tuner", storage_path=str(sweep_dir)),
            )
        try:
            results = tuner.fit()
        except KeyboardInterrupt:  # the parent is marked KILLED by tracked(); so are its running trials
            close_stopped_children(uri, parent)
            raise
        close_stopped_children(uri, parent)
        rows = []
        for r in results:
            m = r.metrics or {}
            trial_json = Path(sweep_cfg["outputs"]) / str(m.get("trial_id", "")) / "trial.json"
            info = json.loads(trial_json.read_text()) if trial_json.exists() else {}
            rows.append({"trial_id": m.get("trial_id"), **{k: m.get(k) for k in SWEEP_METRICS},
                         "run_id": info.get("run_id"),
                         "status": "error" if r.error else ("stopped early" if objectives[0] not in m else "done"),
                         "params": {k: (r.config or {}).get(k) for k in space.params}})
        front = pareto_front(rows, objectives)
        write_front(sweep_dir / "front", rows, front, baseline, objectives)
        tracking.log_artifacts(uri, parent, sweep_dir / "front")
        tracking.log_metrics(uri, parent, {"trials": len(rows), "front_size": len(front),
                                           **{f"baseline_{k}": baseline[k] for k in SWEEP_METRICS
                                              if isinstance(baseline.get(k), (int, float))}}, 0)
        tracking.set_tags(uri, parent, {"objectives": ",".join(objectives)})
    return SweepResult(parent_run_id=parent, rows=rows, front=front, baseline=baseline, out=sweep_dir,
                       objectives=objectives)
