"""Map the fairness / quality trade-off of constrained MNIST diffusion with Ray Tune + Optuna.

Runs the unconstrained baseline, then --num-samples trials (each a Ray Train job), logs everything
to MLflow (one parent run, a child run per trial) and prints the Pareto front of sample quality
(--quality: precision by default, the share of generated digits that look like real ones; precision_class_mean
averages it over classes with equal weights, so it does not move with the class mix) vs fairness (--fairness: tv_to_uniform, the distance of the generated class shares
from uniform), every point with its 95% interval, next to the unconstrained and the rebalanced-data baselines.

    python jobs/tune_mnist.py                                  # cpu preset, 8 trials
    python jobs/tune_mnist.py --smoke                          # seconds-scale check of the machinery
    python jobs/tune_mnist.py --space my_space.yaml --num-samples 32 --preset paper --gpu
    python jobs/tune_mnist.py --name sweep-1 --resume          # continue an interrupted sweep
    python jobs/tune_mnist.py --max-tv 0.1                     # best quality subject to tv_to_uniform <= 0.1
    python jobs/tune_mnist.py --time-budget 2h                 # size the trials for 2 hours (CPU default: 45m)
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cdd_ray.cli import (SWEEP_CPU, SWEEP_SMOKE, add_config_flags, add_ray_flags, add_search_flags,  # noqa: E402
                         add_target_flags, config_from_args, fail, job_errors, setup_logging, sweep_limits, time_budget)
from cdd_ray.config import ConfigError  # noqa: E402
from cdd_ray.placement import check_this_machine  # noqa: E402


def main() -> None:
    started = time.time()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_flags(p)
    add_ray_flags(p)
    p.add_argument("--space", default=str(Path(__file__).resolve().parents[1] / "search_spaces" / "mnist_minority.yaml"),
                   help="search-space file (YAML)")
    p.add_argument("--num-samples", type=int, default=8, help="number of trials")
    p.add_argument("--seed", type=int, default=0, help="Optuna sampler seed")
    p.add_argument("--smoke", action="store_true", help="smoke preset and a few steps: checks the machinery")
    add_target_flags(p)
    add_search_flags(p)
    p.add_argument("--warm-start-steps", type=int, default=None,
                   help="trials start from the baseline and train this many steps (default: optim.steps // 4; "
                        "0: every trial trains from scratch)")
    args = p.parse_args()
    from cdd_ray.session import cluster_gpus

    try:
        gpus = cluster_gpus(args.address or "")  # the cluster's, not this driver's (a CPU head of a GPU cluster)
    except ConfigError as e:
        fail(e)
    if args.smoke:
        args.preset = args.preset or "smoke"
        args.overrides = SWEEP_SMOKE + args.overrides
    elif args.preset is None and gpus > 0:  # one worker per GPU, the authors' model
        args.preset, args.gpu = "paper", True
    elif args.preset in (None, "cpu"):
        args.overrides = SWEEP_CPU + args.overrides
    if args.num_samples < 1:
        fail(ConfigError(f"--num-samples: {args.num_samples} must be >= 1"))
    try:
        budget = time_budget(args, on_cpu=not args.gpu and gpus == 0)
    except ConfigError as e:
        fail(e)
    cfg = config_from_args(args)
    if args.name is None:
        cfg.name = cfg.name.replace("-constrained-", "-sweep-")
    try:
        check_this_machine(cfg, sweep=True)  # in seconds: before the sweep's code is imported and a Ray started
    except ConfigError as e:
        fail(e)
    setup_logging()
    from cdd_ray.tracking import tracking_uri, ui_hint
    from cdd_ray.sweep import load_space, report, run_sweep

    with job_errors() as guard:
        guard.resume_name = cfg.name
        space = load_space(args.space)
        warm = cfg.optim.steps // 4 if args.warm_start_steps is None else args.warm_start_steps
        if warm < 0:
            raise ConfigError(f"--warm-start-steps: {warm} must be >= 0")
        res = run_sweep(cfg, space, args.num_samples, resume=args.resume, seed=args.seed, warm_start_steps=warm,
                        objectives=(args.quality, args.fairness), limits=sweep_limits(args), sampler=args.sampler,
                        time_budget_s=budget, started=started, verbose=args.verbose)
    print()
    print(report(res))
    print(ui_hint(tracking_uri(), res.parent_run_id))


if __name__ == "__main__":
    main()
