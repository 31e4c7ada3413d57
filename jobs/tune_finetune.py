"""Map fine-tuning's trade-off with Ray Tune + Optuna: learning the new digit vs forgetting the old ones.

Runs unconstrained fine-tuning as the reference point, then --num-samples constrained trials (each a
Ray Train job, each starting from the pre-trained model), logs everything to MLflow (one parent run, a
child run per trial) and prints the Pareto front of heldout_loss_new (denoising loss on held-out images
of the new digit) vs forgetting (1 - old-digit share / the pre-trained model's old-digit share).

    python jobs/tune_finetune.py --pretrained runs/pretrained
    python jobs/tune_finetune.py --pretrained runs/pretrained --space my_space.yaml --num-samples 16
    python jobs/tune_finetune.py --pretrained runs/pretrained --smoke     # seconds-scale check
    python jobs/tune_finetune.py --pretrained runs/pretrained --name ft-1 --resume
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cdd_ray.cli import add_config_flags, add_ray_flags, check_resume, flag_overrides, job_errors, name_run, setup_logging  # noqa: E402
from cdd_ray.config import ConfigError, parse_set  # noqa: E402

SMOKE = ["optim.steps=6", "ray.checkpoint_every=1", "eval.n_samples=32"]
SWEEP = ["eval.n_samples=500", "eval.sampler_steps=25", "ray.checkpoint_every=25"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_flags(p, unconstrained=False)
    add_ray_flags(p)
    p.add_argument("--pretrained", required=True, help="checkpoint folder, run output folder or MLflow run id")
    p.add_argument("--space", default=str(Path(__file__).resolve().parents[1] / "search_spaces" / "mnist_finetune.yaml"),
                   help="search-space file (YAML)")
    p.add_argument("--num-samples", type=int, default=8, help="number of trials")
    p.add_argument("--seed", type=int, default=0, help="Optuna sampler seed")
    p.add_argument("--smoke", action="store_true", help="a few steps per trial: checks the machinery")
    args = p.parse_args()
    from cdd_ray.finetune import finetune_config, resolve_pretrained
    from cdd_ray.metrics import FINETUNE_OBJECTIVES
    from cdd_ray.sweep import load_space, report, run_sweep

    with job_errors() as guard:
        check_resume(args)
        if args.num_samples < 1:
            raise ConfigError(f"--num-samples: {args.num_samples} must be >= 1")
        overrides = parse_set((SMOKE if args.smoke else SWEEP) + args.overrides) | flag_overrides(args)
        cfg = name_run(finetune_config(resolve_pretrained(args.pretrained), args.preset, args.config, overrides, None),
                       args, "finetune-sweep")
        space = load_space(args.space)
        setup_logging()
        guard.resume_name = cfg.name
        res = run_sweep(cfg, space, args.num_samples, resume=args.resume, seed=args.seed,
                        objectives=FINETUNE_OBJECTIVES, verbose=args.verbose)
    from cdd_ray.tracking import tracking_uri, ui_hint

    print()
    print(report(res))
    print(f"{ui_hint(tracking_uri(), res.parent_run_id)}; reference: unconstrained fine-tuning")


if __name__ == "__main__":
    main()
