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

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cdd_ray.cli import tune_task_job  # noqa: E402

if __name__ == "__main__":
    tune_task_job("mnist", __doc__)
