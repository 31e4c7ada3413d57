"""Sweeps: Ray Tune + Optuna search the constraint thresholds and dual step sizes, every trial a Ray Train fit, beside
unconstrained references trained with the trials' budget; the result is the quality / fairness front.

``space`` (the YAML search space, each trial's config), ``search`` (Optuna behind Tune, ASHA, the study, the
Tuner), ``trial`` (one trial's fit and MLflow run), ``references`` (the unconstrained runs), ``results`` (rows,
differences, front, what is printed and published), ``table`` (the trials' table on the console), ``run``
(``run_sweep``: the sweep from its checks to its front)."""

from cdd_ray.sweep.results import SweepResult, report
from cdd_ray.sweep.run import run_sweep
from cdd_ray.sweep.space import SearchSpace, load_space

__all__ = ["SearchSpace", "SweepResult", "load_space", "report", "run_sweep"]
