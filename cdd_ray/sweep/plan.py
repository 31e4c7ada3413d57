"""A sweep's time plan: measure this machine and plan the whole sweep before it trains, re-check it after the
baseline (the model is ``cdd_ray.budget``). The plan is printed, kept in the store's ``plan.json`` (a --resume keeps
it) and sent to MLflow and the front with the results."""

from __future__ import annotations

import json
import math
import time
from typing import Any

from cdd_ray import storage as storage_io
from cdd_ray.budget import (MARGIN, MIN_STEP_SHARE, Plan, Shape, Sizes, Throughput, min_eval_samples, min_trials, plan,
                            replan)
from cdd_ray.cluster.probe import calibrate_on_a_worker
from cdd_ray.cluster.trainer import worker_resources
from cdd_ray.config import Config, ConfigError
from cdd_ray.evaluation.fairness import samples_needed
from cdd_ray.sweep.references import reference_config
from cdd_ray.sweep.space import SearchSpace, largest_trial_config

CALIBRATION_SAMPLES = 50  # the calibration's evaluation: a batch of samples, enough to time its parts


def floors(base: Config, requested: Sizes, limits: dict[str, float]) -> Sizes:
    """The smallest sweep a cut may leave (``cdd_ray.budget``): half the steps, half the trials, and the samples
    that resolve a difference of ``budget.RESOLUTION`` and can show each fairness target met."""
    k = len(base.data.classes)
    samples = max([min_eval_samples()] + [samples_needed(m, x, k) for m, x in limits.items()])
    return Sizes(baseline_steps=math.ceil(requested.baseline_steps * MIN_STEP_SHARE),
                 trial_steps=math.ceil(requested.trial_steps * MIN_STEP_SHARE),
                 trials=min_trials(requested.trials), samples=min(requested.samples, samples))


def first_plan(base: Config, space: SearchSpace, store: str, budget_s: float, started: float, num_samples: int,
               warm_start_steps: int, baseline_overrides: dict[str, Any] | None, limits: dict[str, float],
               parallel: int, resume: bool, confirm_seeds: int = 0) -> dict[str, Any]:
    """The plan made before anything trains, from a calibration on a worker of the runs' size; refused (a
    ``ConfigError`` naming --time-budget) when even the smallest sweep cannot fit. A resumed sweep keeps its plan.
    ``confirm_seeds``: the plan holds that many further seeds of the references and of the front's two ends."""
    plan_file = storage_io.join(store, "plan.json")
    saved = storage_io.read_text(plan_file) if resume else None
    if saved:
        kept = json.loads(saved)
        print(f"time budget: the interrupted sweep's plan: {kept['num_trials']} trials of {kept['trial_steps']} "
              f"steps. {kept['cut']}", flush=True)
        return kept
    shapes = {"baseline": reference_config(base, "baseline", base.optim.steps, overrides=baseline_overrides),
              "trial": largest_trial_config(space, base)}
    t0 = time.time()
    cal = calibrate_on_a_worker(shapes, worker_resources(base), CALIBRATION_SAMPLES)
    cal["seconds"] = time.time() - t0
    steps = warm_start_steps or base.optim.steps
    requested = Sizes(baseline_steps=base.optim.steps, trial_steps=steps, trials=num_samples,
                      samples=base.eval.n_samples)
    shape = Shape(baseline=cal["images_per_step"]["baseline"], reference=base.optim.batch_size,
                  trial=cal["images_per_step"]["trial"],
                  references=int(warm_start_steps > 0) + int(not base.is_finetune), parallel=parallel,
                  confirm_references=confirm_seeds * (1 + int(not base.is_finetune)), confirm_points=2 * confirm_seeds)
    p = plan(budget_s, time.time() - started, Throughput.from_calibration(cal), shape, requested,
             floors(base, requested, limits))
    if not p.fits:
        raise ConfigError(f"--time-budget: measured this machine in {cal['seconds']:.0f} s "
                          f"({1 / p.throughput['s_per_image']:.0f} training images/s): {p.cut}")
    print(p.describe(), flush=True)
    d = p.to_dict() | {"calibration": cal}
    storage_io.write_text(plan_file, json.dumps(d, indent=2))
    return d


def apply_plan(base: Config, sweep_plan: dict[str, Any]) -> None:
    """The planned baseline steps and evaluation samples, in ``base`` (every run's config comes from it)."""
    if "sizes" in sweep_plan:  # a plan of an older cdd-ray (made after the baseline) sized the trials only
        base.optim.steps = sweep_plan["sizes"]["baseline_steps"]
        base.eval.n_samples = sweep_plan["sizes"]["samples"]


def recheck(sweep_plan: dict[str, Any], store: str, baseline: dict[str, Any], driver_s: float, used_s: float,
            warm_started: bool) -> dict[str, Any]:
    """The plan adjusted to what the baseline measured: the trials' steps (when warm-started: from scratch they
    match the baseline's) and count, within the first plan's floors; the evaluation's samples stay."""
    if sweep_plan.get("stage") != "before training":  # resumed after its re-check, or an older plan
        return sweep_plan
    first = Plan.from_dict(sweep_plan)
    tp = Throughput.from_baseline(baseline, max(driver_s, float(baseline.get("wall_s") or 0.0)), first.shape.baseline)
    p = replan(first, tp, used_s, warm_started)
    print(p.describe() if p.fits else f"{p.describe()} The sweep goes on at that smallest size.", flush=True)
    before = {k: v for k, v in sweep_plan.items() if k != "calibration"}
    d = p.to_dict() | {"calibration": sweep_plan["calibration"], "before_training": before}
    storage_io.write_text(storage_io.join(store, "plan.json"), json.dumps(d, indent=2))
    return d


def time_left(sweep_plan: dict[str, Any], started: float) -> tuple[float, float] | None:
    """(seconds one confirmation run costs, seconds of the budget left for them, with the plan's margin) by the
    plan's re-checked throughput; None without a plan."""
    if not sweep_plan or "sizes" not in sweep_plan:
        return None
    sizes, shape = sweep_plan["sizes"], sweep_plan["shape"]
    run_s = Throughput(**sweep_plan["throughput"]).run_s(sizes["trial_steps"], shape["trial"], sizes["samples"])
    return run_s, (sweep_plan["budget_s"] - (time.time() - started)) * MARGIN
