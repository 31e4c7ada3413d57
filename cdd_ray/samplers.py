"""The Optuna samplers a sweep can search with, and the default one.

Its own small module so that a job's command line (``--sampler``'s choices and default) is built without importing
the sweep's code. The default is chosen by ``benchmarks/search.py`` with ASHA on, as the sweep runs
(BENCHMARKS.md, section 6).
"""

from __future__ import annotations

import optuna

from cdd_ray.config import ConfigError

SAMPLERS = ("tpe", "gp", "tpe-startup10", "random")
DEFAULT_SAMPLER = "tpe"
STARTUP_TRIALS = 3  # random trials before a model-based sampler takes over (an 8-trial sweep searches 5)


def make_sampler(name: str, seed: int):
    """The Optuna sampler ``name`` (SAMPLERS). Each reads the fairness slack of finished trials (constraints).

    tpe: Optuna's TPE after a short random start-up (STARTUP_TRIALS), multivariate; tpe-startup10: Optuna's
    default TPE, whose 10 random start-up trials make an 8-trial sweep a random search; gp: Optuna's
    Gaussian-process sampler after the same start-up; random: plain random search (the benchmark's rival).
    """
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=STARTUP_TRIALS, multivariate=True)
    if name == "tpe-startup10":
        return optuna.samplers.TPESampler(seed=seed)
    if name == "gp":
        return optuna.samplers.GPSampler(seed=seed, n_startup_trials=STARTUP_TRIALS)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    raise ConfigError(f"--sampler: {name!r} not allowed; allowed: {', '.join(SAMPLERS)}")
