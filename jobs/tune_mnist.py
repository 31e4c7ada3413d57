"""Map the fairness / quality trade-off of constrained MNIST diffusion with Ray Tune + Optuna.

Runs the unconstrained baseline, then --num-samples trials (each a Ray Train job), logs everything
to MLflow (one parent run, a child run per trial) and prints the Pareto front of sample quality
(--quality: fid_data, FID against held-out digits in the training data's class mix, by default) vs
fairness (tv_to_uniform, the distance of the generated class shares from uniform).

    python jobs/tune_mnist.py                                  # cpu preset, 8 trials
    python jobs/tune_mnist.py --smoke                          # seconds-scale check of the machinery
    python jobs/tune_mnist.py --space my_space.yaml --num-samples 32 --preset paper --gpu
    python jobs/tune_mnist.py --name sweep-1 --resume          # continue an interrupted sweep
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cdd_ray.cli import (SWEEP_CPU, SWEEP_SMOKE, add_config_flags, add_ray_flags, config_from_args, fail,  # noqa: E402
                         job_errors, setup_logging)
from cdd_ray.config import ConfigError  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_flags(p)
    add_ray_flags(p)
    p.add_argument("--space", default=str(Path(__file__).resolve().parents[1] / "search_spaces" / "mnist_minority.yaml"),
                   help="search-space file (YAML)")
    p.add_argument("--num-samples", type=int, default=8, help="number of trials")
    p.add_argument("--seed", type=int, default=0, help="Optuna sampler seed")
    p.add_argument("--smoke", action="store_true", help="smoke preset and a few steps: checks the machinery")
    p.add_argument("--quality", default="fid_data", choices=["fid_data", "fid"],
                   help="quality objective next to tv_to_uniform: fid_data (FID vs held-out digits in the training "
                        "data's class mix: fidelity to the data) or fid (vs a class-balanced reference, which also "
                        "rewards fairness, so the two objectives mostly agree)")
    p.add_argument("--warm-start-steps", type=int, default=None,
                   help="trials start from the baseline and train this many steps (default: optim.steps // 4; "
                        "0: every trial trains from scratch)")
    args = p.parse_args()
    import torch

    gpus = torch.cuda.device_count()
    if args.smoke:
        args.preset = args.preset or "smoke"
        args.overrides = SWEEP_SMOKE + args.overrides
    elif args.preset is None and gpus > 0:  # one worker per GPU, the authors' model
        args.preset, args.gpu = "paper", True
    elif args.preset in (None, "cpu"):
        args.overrides = SWEEP_CPU + args.overrides
    if args.num_samples < 1:
        fail(ConfigError(f"--num-samples: {args.num_samples} must be >= 1"))
    cfg = config_from_args(args)
    if args.name is None:
        cfg.name = cfg.name.replace("-constrained-", "-sweep-")
    setup_logging()
    from cdd_ray.tracking import tracking_uri
    from cdd_ray.tune import format_front, load_space, run_sweep

    with job_errors() as guard:
        guard.resume_name = cfg.name
        space = load_space(args.space)
        warm = cfg.optim.steps // 4 if args.warm_start_steps is None else args.warm_start_steps
        if warm < 0:
            raise ConfigError(f"--warm-start-steps: {warm} must be >= 0")
        res = run_sweep(cfg, space, args.num_samples, resume=args.resume, seed=args.seed, warm_start_steps=warm,
                        objectives=(args.quality, "tv_to_uniform"))
    print()
    ref = "baseline continued for the trials' budget" if warm else "baseline"
    q, f = res.objectives
    print(f"Pareto front ({q} vs {f}, both lower is better; {len(res.rows)} trials, {len(res.front)} on the front; "
          f"reference: {ref}):")
    print(format_front(res.front, res.baseline, res.objectives))
    print()
    print(f"sweep folder: {res.out}  (front/pareto.csv, front/tradeoff.png, front/best_configs.json)")
    print(f"MLflow parent run: {res.parent_run_id} in {tracking_uri()}")
    print("open the UI: mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1")


if __name__ == "__main__":
    main()
