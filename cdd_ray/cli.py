"""Flags shared by the jobs: preset, YAML config, ``--set`` overrides, Ray placement."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, NoReturn

from cdd_ray.budget import parse_duration
from cdd_ray.cluster.placement import check_this_machine
from cdd_ray import preflight
from cdd_ray.config import PRESETS, Config, ConfigError, build_config, parse_set, validate
from cdd_ray.front import check_request
from cdd_ray.metrics import FAIRNESS_METRICS, OVERFITTING_METRICS, QUALITY_METRICS
from cdd_ray.samplers import DEFAULT_SAMPLER, SAMPLERS, STARTUP_TRIALS
from cdd_ray.tasks import task_config
from cdd_ray.tracking import TrackingError, tracking_uri, ui_hint


def add_config_flags(p: argparse.ArgumentParser, unconstrained: bool = True) -> None:
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="model/budget preset (default: cpu; paper = the authors' 32x32 UNet)")
    p.add_argument("--config", default=None, help="YAML file with config sections (data, model, dual, optim, eval, ray)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config field, e.g. --set dual.eta=0.05 (repeatable)")
    if unconstrained:
        p.add_argument("--unconstrained", action="store_true", default=None,
                       help="train the unconstrained baseline (no constraints, no dual steps)")
    p.add_argument("--name", default=None, help="run name (Ray run folder under --storage)")


def add_baseline_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--baseline", default=None, metavar="RUN",
                   help="an unconstrained run's --out folder: its measured class shares are the q of the theory "
                        "check predicted_shares_from_baseline (docs/TRAINING.md: What a run writes)")


def with_baseline(cfg: Config, ref: str | None) -> Config:
    """``--baseline RUN``: ``eval.baseline_shares`` from the unconstrained run's summary.json, whose classes must be
    this run's ``data.classes``."""
    if not ref:
        return cfg
    f = Path(ref).expanduser() / "summary.json"
    try:
        s = json.loads(f.read_text())
        shares, ids, constrained = list(s["class_shares"]), list(s["class_ids"]), s["constrained"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"--baseline: {ref!r} is not a finished run's --out folder ({f}: {e})") from None
    if constrained:
        raise ConfigError(f"--baseline: {ref!r} is a constrained run; give an unconstrained one (--unconstrained)")
    if ids != cfg.data.classes:
        raise ConfigError(f"--baseline: {ref!r} generated classes {ids}, this run's data.classes are "
                          f"{cfg.data.classes}")
    cfg.eval.baseline_shares = shares
    validate(cfg)
    return cfg


def add_ray_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workers", type=int, default=None, help="Ray Train workers (data parallel)")
    p.add_argument("--gpu", action="store_true", default=None, help="one GPU per worker")
    p.add_argument("--storage", default=None, help="absolute path or URI for Ray run storage (default runs/ray)")
    p.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else local)")
    p.add_argument("--resume", action="store_true", help="continue the run --name from its latest checkpoint")
    p.add_argument("--verbose", action="store_true",
                   help="Ray's own console lines too (Ray Train's line per report and checkpoint, Tune's status "
                        "tables); by default they stay in Ray's log files and the console shows a progress bar "
                        "(a run) or the trials' table (a sweep)")

_FLAG_KEYS = {"name": "name", "workers": "ray.workers", "gpu": "ray.gpu", "storage": "ray.storage",
              "address": "ray.address", "root": "data.root", "vae": "model.vae"}
SUMMARY_KEYS = ("minority_share", "minority_share_ci", "tv_to_uniform", "tv_to_uniform_ci", "tv_floor", "tv_excess",
                "fd", "fd_ci", "precision", "precision_ci", "precision_class_mean", "precision_class_mean_ci", "recall",
                "fid_class_mean", "fid", "fid_ci", "fid_data", "fid_features",
                "lambda", "prediction_error", "prediction_error_floor", "prediction_error_baseline",
                "prediction_error_baseline_floor", "classifier_accuracy", "data_source",
                "wall_s")
# Sweeps (tune_* jobs): --smoke checks the machinery; on CPU a sweep evaluates many models, so fewer samples
# and DDIM steps than a single run (the same for every trial and the baseline) and frequent reports for ASHA
# (ray.report_every: ASHA's clock, in primal steps; warm-started trials train 2 steps in a smoke sweep, 300 on CPU).
SWEEP_SMOKE = ["optim.steps=8", "ray.checkpoint_every=1", "eval.n_samples=32", "ray.report_every=1"]
SWEEP_CPU = ["optim.steps=1200", "eval.n_samples=500", "eval.sampler_steps=25", "ray.checkpoint_every=25",
             "ray.report_every=50"]


def add_target_flags(p: argparse.ArgumentParser) -> None:
    """The sweep's objectives and fairness targets (minority-class tasks)."""
    p.add_argument("--quality", default="precision",
                   choices=QUALITY_METRICS,
                   help="quality objective (docs/TUNING.md): precision (default; per sample, so share-weighted over "
                        "classes: it moves with the class mix when classes differ in precision), precision_class_mean "
                        "(per-class precision, equal class weights: mix-free), fid_class_mean (per-class FID, mean; "
                        "mix-free), fid (balanced reference, the paper's; rewards "
                        "fairness too), fid_data (training class mix; penalises fairness), recall")
    p.add_argument("--fairness", default="tv_to_uniform", choices=FAIRNESS_METRICS,
                   help="fairness objective: tv_to_uniform or fd (L2 distance of the class shares to uniform)")
    p.add_argument("--overfitting", default="copy_rate", choices=OVERFITTING_METRICS,
                   help="over-fitting measure shown beside the objectives (the differences to the references, "
                        "tradeoff.png's second panel; docs/EVALUATION.md): copy_rate (default; samples nearer a "
                        "training image than 99%% of unseen real ones, in pixels), copy_rate_features (the same in "
                        "the FID features), generalization_gap (held-out minus training denoising loss)")
    p.add_argument("--max-tv", type=float, default=None, metavar="X",
                   help="fairness target: search for the best quality with tv_to_uniform <= X")
    p.add_argument("--max-fd", type=float, default=None, metavar="X",
                   help="fairness target: search for the best quality with fd <= X")

DEFAULT_CPU_BUDGET = "45m"


def add_search_flags(p: argparse.ArgumentParser) -> None:
    """The sweep's sampler and wall-clock budget."""
    p.add_argument("--sampler", default=DEFAULT_SAMPLER, choices=SAMPLERS,
                   help=f"Optuna sampler (default {DEFAULT_SAMPLER}, chosen by benchmarks/search.py; tpe and gp start "
                        f"with {STARTUP_TRIALS} random trials, tpe-startup10 with 10, Optuna's default)")
    p.add_argument("--time-budget", default=None, metavar="DURATION",
                   help=f"end the sweep within this wall time, e.g. 45m, 1h30m, 2700 (seconds) or off: the baseline "
                        f"measures the machine and the trials' steps and count are sized to fit (default "
                        f"{DEFAULT_CPU_BUDGET} on CPU, off with GPUs or --smoke)")
    p.add_argument("--confirm-seeds", type=int, default=None, metavar="K",
                   help="after the trials, re-train both references and the front with K further training seeds and "
                        "judge each point against each reference over the seeds (better / worse / not "
                        "distinguishable; front/verdict.csv). Under a time budget the plan holds the references' and "
                        "the front's two ends' runs, the rest of the front as time allows (default 1; 0 with "
                        "--smoke; 0: none)")


def confirm_seeds(args: argparse.Namespace) -> int:
    """--confirm-seeds: 1 unless given, 0 for --smoke (a check of the machinery)."""
    return args.confirm_seeds if args.confirm_seeds is not None else 0 if args.smoke else 1


def time_budget(args: argparse.Namespace, on_cpu: bool) -> float | None:
    """Seconds of --time-budget (its CPU default when not given); None: no budget."""
    if args.time_budget is None:
        return parse_duration(DEFAULT_CPU_BUDGET) if on_cpu and not args.smoke else None
    return parse_duration(args.time_budget)


def sweep_limits(args: argparse.Namespace) -> dict[str, float]:
    limits = {"tv_to_uniform": args.max_tv, "fd": args.max_fd}
    return {k: v for k, v in limits.items() if v is not None}


def config_from_args(args: argparse.Namespace) -> Config:
    """Build and validate the config, or exit with the error message (status 2)."""
    try:
        check_resume(args)
        cfg = build_config(args.preset, args.config, parse_set(args.overrides) | flag_overrides(args),
                           args.unconstrained)
        cfg = with_baseline(cfg, getattr(args, "baseline", None))
        return name_run(cfg, args, "baseline" if cfg.unconstrained else "constrained")
    except ConfigError as e:
        fail(e)


def check_resume(args: argparse.Namespace) -> None:
    if getattr(args, "resume", False) and not args.name:
        raise ConfigError("--resume needs --name: the run to continue")


def flag_overrides(args: argparse.Namespace) -> dict[str, object]:
    """Config overrides from the Ray / name flags that were given."""
    return {key: getattr(args, flag) for flag, key in _FLAG_KEYS.items() if getattr(args, flag, None) is not None}


def name_run(cfg: Config, args: argparse.Namespace, kind: str) -> Config:
    """Without --name (and no name in the config): <preset>-<kind>-<time>."""
    if args.name is None and cfg.name == Config.name:
        cfg.name = f"{cfg.model.preset}-{kind}-{time.strftime('%Y%m%d-%H%M%S')}"
    return cfg


@dataclass
class JobGuard:
    """What the job tells ``job_errors`` once it knows: the Ray run to --resume after Ctrl-C."""

    resume_name: str | None = None


@contextlib.contextmanager
def job_errors() -> Iterator[JobGuard]:
    """Bad input: exit 2 with the message. MLflow store away: exit 1 naming the URI. Ctrl-C: exit 130,
    saying how to continue (the runner has already marked the MLflow run KILLED; checkpoints are kept)."""
    guard = JobGuard()
    try:
        yield guard
    except ConfigError as e:
        fail(e)
    except TrackingError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        how = f"; continue with the same command plus --resume --name {guard.resume_name}" if guard.resume_name else ""
        print(f"interrupted: MLflow run marked KILLED, checkpoints kept{how}", file=sys.stderr)
        raise SystemExit(130) from None


def run_training(cfg: Config, args: argparse.Namespace, guard: JobGuard) -> tuple[dict, str]:
    """Train ``cfg``: in this process with --local, else on Ray Train (--resume continues --name);
    returns the summary and the output folder (--out, default runs/<name>). What this machine cannot hold and
    folders or a store it cannot write are refused first, in a second: before the training code is imported (10 s
    of torch, diffusers and MLflow) and a Ray started."""
    out = args.out or f"runs/{cfg.name}"
    preflight.check_out(out)
    if not args.local:
        check_this_machine(cfg)
        storage = preflight.check_storage(preflight.resolve_storage(cfg.ray.storage))
        preflight.check_run_name(storage, cfg.name, args.resume)
    preflight.check_tracking(tracking_uri())
    from cdd_ray.runner import run_local, run_ray  # torch, Ray, MLflow: after the flags are checked (fast errors)

    setup_logging()
    guard.resume_name = None if args.local else cfg.name
    if args.local:
        return run_local(cfg, out), out
    return run_ray(cfg, out, resume=args.resume, verbose=args.verbose), out


def fail(e: Exception) -> NoReturn:
    print(f"error: {e}", file=sys.stderr)
    raise SystemExit(2)


def setup_logging() -> None:
    """INFO lines of the project on the console; MLflow's "Creating initial MLflow database tables..." and
    "Updating database tables" (a new SQLite store) only when something goes wrong."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)

# ---------------------------------------------------------------- the Celeb-A / ImageNet-subset jobs


def add_task_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--root", default=None, help="data root (docs/DATA.md: Data layouts)")
    p.add_argument("--vae", default=None, help="local diffusers AutoencoderKL folder: latent diffusion")


def train_task_job(task: str, doc: str, argv: list[str] | None = None) -> None:
    """``jobs/train_<task>.py``: one constrained (or --unconstrained) run of a ``cdd_ray.tasks`` task."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_flags(p)
    add_baseline_flag(p)
    add_ray_flags(p)
    add_task_flags(p)
    p.add_argument("--out", default=None, help="output directory (default: runs/<name>)")
    p.add_argument("--local", action="store_true", help="train in this process instead of on Ray Train")
    args = p.parse_args(argv)
    with job_errors() as guard:
        check_resume(args)
        cfg = task_config(task, args.preset, args.config, parse_set(args.overrides) | flag_overrides(args),
                          args.unconstrained)
        cfg = with_baseline(cfg, args.baseline)
        cfg = name_run(cfg, args, f"{task}-{'baseline' if cfg.unconstrained else 'constrained'}")
        summary, out = run_training(cfg, args, guard)
    print(json.dumps({k: summary.get(k) for k in SUMMARY_KEYS}, indent=2))
    print(f"wrote {Path(out).resolve()}")


def tune_task_job(task: str, doc: str, argv: list[str] | None = None) -> None:
    """``jobs/tune_<task>.py`` (``mnist`` or a ``cdd_ray.tasks`` task): baselines + Optuna trials on Ray Tune;
    prints the quality / fairness front. On a cluster with GPUs and no --preset: the ``paper`` preset, one GPU per
    worker. Everything this machine or the cluster cannot hold is refused in seconds, before the sweep's code is
    imported."""
    from cdd_ray.cluster.session import cluster_gpus  # Ray itself (a second or two): only the sweep's jobs ask the cluster

    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_flags(p, unconstrained=False)
    add_ray_flags(p)
    add_task_flags(p)
    p.add_argument("--space", default=str(Path(__file__).resolve().parents[1] / "search_spaces" / f"{task}_minority.yaml"),
                   help="search-space file (YAML)")
    p.add_argument("--num-samples", type=int, default=8, help="number of trials")
    p.add_argument("--seed", type=int, default=0, help="Optuna sampler seed")
    p.add_argument("--smoke", action="store_true", help="smoke preset and a few steps: checks the machinery")
    p.add_argument("--warm-start-steps", type=int, default=None,
                   help="trials start from the baseline and train this many steps (default: optim.steps // 4; "
                        "0: every trial trains from scratch)")
    add_target_flags(p)
    add_search_flags(p)
    args = p.parse_args(argv)
    started = time.time()
    with job_errors() as guard:
        check_resume(args)
        if args.num_samples < 1:
            raise ConfigError(f"--num-samples: {args.num_samples} must be >= 1")
        gpus = cluster_gpus(args.address or "")  # the cluster's, not this driver's (a CPU head of a GPU cluster)
        preset = "smoke" if args.smoke and args.preset is None else args.preset
        if preset is None and gpus > 0:  # one worker per GPU, the authors' model
            preset, args.gpu = "paper", True
        budget = time_budget(args, on_cpu=not args.gpu and gpus == 0)
        extra = SWEEP_SMOKE if args.smoke else (SWEEP_CPU if preset in (None, "cpu") else [])
        overrides = parse_set(extra + args.overrides) | flag_overrides(args)
        cfg = (build_config(preset, args.config, overrides) if task == "mnist"
               else task_config(task, preset, args.config, overrides))
        cfg = name_run(cfg, args, "sweep" if task == "mnist" else f"{task}-sweep")
        check_this_machine(cfg, sweep=True)  # in seconds: before the sweep's code is imported and a Ray started
        check_request((args.quality, args.fairness), sweep_limits(args), args.overfitting, cfg.eval.n_samples,
                      len(cfg.data.classes), confirm_seeds(args))
        preflight.check_storage(preflight.resolve_storage(cfg.ray.storage))
        preflight.check_tracking(tracking_uri())
        from cdd_ray.sweep import load_space, report, run_sweep  # torch, Ray Tune, Optuna: after the checks

        space = load_space(args.space)
        warm = cfg.optim.steps // 4 if args.warm_start_steps is None else args.warm_start_steps
        if warm < 0:
            raise ConfigError(f"--warm-start-steps: {warm} must be >= 0")
        setup_logging()
        guard.resume_name = cfg.name
        res = run_sweep(cfg, space, args.num_samples, resume=args.resume, seed=args.seed, warm_start_steps=warm,
                        objectives=(args.quality, args.fairness), limits=sweep_limits(args), sampler=args.sampler,
                        time_budget_s=budget, started=started, verbose=args.verbose, overfitting=args.overfitting,
                        confirm_seeds=confirm_seeds(args))
    print()
    print(report(res))
    print(ui_hint(tracking_uri(), res.parent_run_id))
