"""A sweep's wall-clock budget: measure the machine during the baseline, then size the trials to fit.

Machines differ (the default CPU sweep took 38 minutes on one 2-core machine and 79 on another), so
``--time-budget 45m`` does not guess: the sweep's first run, the unconstrained baseline, measures

- ``s_per_image``: training seconds per image of a primal step (its ``train_s`` over steps x images per step);
- ``fixed_s``: everything a run costs besides training (Ray Train start-up, data, the evaluation's sampling,
  MLflow), i.e. the baseline's wall time on the driver less its training and its one-off classifier training;

and ``plan`` sizes what is left of the budget: the reference runs (same steps as a trial, objective batch only)
and the trials (each at the *largest* images per step its search space allows). On CPU one run already uses every
core, so trials running side by side are counted as sharing the machine (no speed-up); with GPUs each concurrent
trial has its own. ASHA's early stops are not counted on: the estimate is an upper bound.

What is cut, in this order: first the trials' steps (down to ``min_steps``; only for warm-started trials, whose
references are trained for the same steps, so every comparison stays at equal budget), never the count below
``--num-samples``; time left over at full steps buys more trials.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from typing import Any

from cdd_ray.config import ConfigError

MARGIN = 0.92  # plan to this share of the time left: the estimate's error and the final front's few seconds
_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0}


def parse_duration(text: str, flag: str = "--time-budget") -> float | None:
    """'45m', '1h30m', '90s', '2700' (seconds) -> seconds; 'off' / '0' / 'none' -> None (no budget)."""
    t = str(text).strip().lower()
    if t in ("off", "none", "0", ""):
        return None
    if re.fullmatch(r"\d+(\.\d+)?", t):
        seconds = float(t)
    elif re.fullmatch(r"(\d+(\.\d+)?[hms])+", t):
        seconds = sum(float(n) * _UNITS[u] for n, u in re.findall(r"(\d+(?:\.\d+)?)([hms])", t))
    else:
        raise ConfigError(f"{flag}: {text!r} is not a duration; allowed: e.g. 45m, 1h30m, 90s, 2700 (seconds) or off")
    if seconds < 60:
        raise ConfigError(f"{flag}: {text!r} is under a minute; a sweep needs at least its baseline and one trial")
    return seconds


@dataclass
class Throughput:
    """What the baseline measured on this machine."""

    s_per_image: float  # training seconds per image of a primal step
    fixed_s: float  # seconds per run besides training

    @classmethod
    def from_baseline(cls, summary: dict[str, Any], driver_s: float, images_per_step: int) -> "Throughput":
        steps = max(1, int(summary.get("steps") or 0))
        train_s = float(summary["train_s"])
        clf_s = float((summary.get("eval_s") or {}).get("classifier", 0.0))  # trained once, cached for the rest
        return cls(s_per_image=train_s / steps / images_per_step, fixed_s=max(0.0, driver_s - train_s - clf_s))

    def run_s(self, steps: int, images_per_step: int) -> float:
        return self.fixed_s + steps * images_per_step * self.s_per_image


@dataclass
class Plan:
    """How the sweep spends its budget after the baseline; ``cut`` says what the budget took away."""

    budget_s: float
    used_s: float  # by the time of planning (Ray start, the baseline)
    trial_steps: int
    num_trials: int
    estimate_s: float  # of the references and trials together
    requested_steps: int
    requested_trials: int
    references: int
    parallel: int
    throughput: dict[str, float]
    cut: str

    def describe(self) -> str:
        end = self.used_s + self.estimate_s
        return (f"time budget {self.budget_s / 60:.0f} min: {self.used_s / 60:.1f} min used by the baseline; "
                f"plan: {self.references} reference run(s) and {self.num_trials} trials of {self.trial_steps} steps, "
                f"estimated {self.estimate_s / 60:.1f} min more (ends by ~{end / 60:.0f} min; measured "
                f"{1 / self.throughput['s_per_image']:.0f} training images/s, {self.throughput['fixed_s']:.0f} s "
                f"per run besides training; {self.parallel} trial(s) at a time counted as "
                f"{'sharing the CPUs' if self.parallel == 1 else 'independent'}). {self.cut}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def plan(budget_s: float, used_s: float, tp: Throughput, *, steps: int, trials: int, min_steps: int,
         trial_images: int, reference_images: int, references: int, parallel: int = 1,
         cut_steps: bool = True) -> Plan:
    """Trial steps and count that fit ``budget_s - used_s`` (times MARGIN); see the module's docstring.

    ``trial_images`` / ``reference_images``: images per primal step of the costliest trial / of a reference run;
    ``references``: reference runs still to train, at the trials' steps; ``parallel``: trials whose costs overlap.
    """
    left = (budget_s - used_s) * MARGIN

    def cost(n: int, w: int) -> float:
        return references * tp.run_s(w, reference_images) + math.ceil(n / parallel) * tp.run_s(w, trial_images)

    common = dict(budget_s=budget_s, used_s=used_s, requested_steps=steps, requested_trials=trials,
                  references=references, parallel=parallel, throughput=asdict(tp))
    if cost(trials, steps) <= left:  # full steps fit: spend what is left on more trials
        n = trials
        while cost(n + 1, steps) <= left:
            n += 1
        cut = ("nothing cut." if n == trials else
               f"nothing cut; the time left buys {n - trials} more trials than --num-samples {trials}.")
        return Plan(trial_steps=steps, num_trials=n, estimate_s=cost(n, steps), cut=cut, **common)
    w = steps
    if cut_steps:
        # cost is linear in w: solve for the largest w that fits, then floor it at min_steps
        per_step = (references * reference_images + math.ceil(trials / parallel) * trial_images) * tp.s_per_image
        fixed = (references + math.ceil(trials / parallel)) * tp.fixed_s
        w = max(min(steps, int((left - fixed) / per_step)) if per_step > 0 else steps, min(min_steps, steps))
    over = cost(trials, w) - left / MARGIN
    cut = (f"cut: trials and references train {w} steps instead of {steps}." if w < steps else "nothing cut.")
    if over > 0:
        why = "" if cut_steps else " (trials that train from scratch keep their steps: their reference is the baseline)"
        cut = ("" if w == steps else cut) + (f" Even so the budget is exceeded by about {over / 60:.1f} min{why}: "
               f"give a longer --time-budget, fewer --num-samples or a smaller model.")
        cut = cut.strip()
    return Plan(trial_steps=w, num_trials=trials, estimate_s=cost(trials, w), cut=cut, **common)
