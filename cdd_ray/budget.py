"""A sweep's wall-clock budget: measure the machine before training, plan the whole sweep, re-check after the
baseline.

Machines differ (on the cpu preset one 2-core machine trains 362 images/s, another 142), so ``--time-budget 45m``
does not guess. Before anything trains, ``cdd_ray.calibrate`` times a few of the loop's primal steps at the
baseline's and the costliest trial's shape and one small evaluation, on a worker of the size the runs get; from
that ``Throughput.from_calibration`` estimates what each run costs:

- ``s_per_image``: training seconds per image of a primal step, the calibrated step times ``LOOP_OVERHEAD`` (the
  loop's dual steps, reports and checkpoints, which the calibration does not run);
- ``startup_s``: per run, besides training and evaluation (Ray Train's worker group, data, MLflow): a prior,
  ``RUN_STARTUP_S``, until the baseline measures it;
- the evaluation: per generated sample (sampling, and the quality metrics' share of the pooled generated + reference
  features) and a fixed part (the reference's share).

``plan`` sizes the baseline, the references, the trials and the confirmation runs (``--confirm-seeds K``: K further
training seeds of both references and of the front's two ends, ``cdd_ray.sweep.confirm``) together so that they fit
``MARGIN`` of the time left, and the plan is printed before the baseline starts. When the requested sweep does not fit it cuts, in this order,
each only as far as needed and never below its floor:

1. the primal steps of the baseline and of the trials (and references) by the same share, down to
   ``MIN_STEP_SHARE`` of what was asked (every comparison stays at equal budget: trials and references always
   train the same steps);
2. the number of trials, down to ``min_trials`` (half of ``--num-samples``, rounded up);
3. the evaluation's samples, down to ``min_eval_samples()``: the sample count at which the 95% interval of a
   difference between two points' precision or tv_to_uniform is at most +-``RESOLUTION`` whatever the models;
4. the confirmation runs, all of them, when even the floors miss the budget with them and fit without.

Steps go first because they cost the most and buy the least at the margin; the evaluation's samples go last because
every point's interval widens with fewer (and they cost little: about a tenth of a run on CPU); the confirmation
goes after them, since a verdict over seeds is what the sweep is read by, but a sweep without one beats no sweep (a
machine half as fast as this one's 388 images/s holds the default sweep only without it). If even the floors
do not fit, the job says so, with the budget that would, before anything trains. After the baseline the plan is
re-checked with what the baseline measured (``Throughput.from_baseline``) and the trials' steps and count adjusted
(the evaluation's samples stay: every point must be evaluated alike). A budget left over at full size buys more
trials. On CPU one run already uses every core, so trials side by side are counted as sharing the machine; with GPUs
each concurrent trial has its own. ASHA's early stops are not counted on: the estimate is an upper bound.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, replace
from typing import Any, Callable

from cdd_ray.config import ConfigError

MARGIN = 0.92  # plan to this share of the time left: the estimate's error and the final front's few seconds
# The loop's time per image in a run over the calibrated step's: 1.22 on an AMD EPYC (the calibration's 388 images/s,
# the baseline's loop 318; 2026-12-07), 1.24-1.33 on the AMD machine of issue #29 (BENCHMARKS.md, "The budget's model").
LOOP_OVERHEAD = 1.25
RUN_STARTUP_S = 30.0  # per run besides training and evaluation, until the baseline measures it
MIN_STEP_SHARE = 0.5  # trials of the default sweep at a third of their steps were too short for the multipliers to act
RESOLUTION = 0.1  # the difference in precision or tv that two points' interval must still resolve at the floor
Z95 = 1.959964
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


def min_eval_samples(resolution: float = RESOLUTION) -> int:
    """The fewest generated samples at which the 95% interval of the difference of two independent points'
    precision (a share) or tv_to_uniform (half the L1 distance of shares) is at most +-``resolution`` for any
    models: each has a standard error of at most 0.5 / sqrt(n), their difference sqrt(2) times that."""
    return math.ceil((Z95 * math.sqrt(2) * 0.5 / resolution) ** 2)


def min_trials(requested: int) -> int:
    """The fewest trials a cut leaves: half of ``--num-samples``, rounded up."""
    return max(1, math.ceil(requested / 2))


@dataclass
class Throughput:
    """What a run costs on this machine: training per image, a fixed start-up, the evaluation."""

    s_per_image: float  # training seconds per image of a primal step
    startup_s: float  # per run besides training and evaluation
    eval_per_sample_s: float = 0.0  # evaluation seconds per generated sample
    eval_fixed_s: float = 0.0  # evaluation seconds whatever the samples (the reference's features)

    @classmethod
    def from_calibration(cls, cal: dict[str, Any]) -> "Throughput":
        """From ``cdd_ray.calibrate.measure``: the slowest shape's seconds per image, times LOOP_OVERHEAD."""
        ev = cal["eval"]
        per_sample, fixed = _eval_model(ev["sampling"], ev["quality"], ev["samples"], ev["reference"],
                                        ev.get("overfitting", 0.0))
        return cls(s_per_image=max(cal["s_per_image"].values()) * LOOP_OVERHEAD, startup_s=RUN_STARTUP_S,
                   eval_per_sample_s=per_sample, eval_fixed_s=fixed)

    @classmethod
    def from_baseline(cls, summary: dict[str, Any], driver_s: float, images_per_step: int) -> "Throughput":
        """From the baseline's summary and its wall time on the driver (less the labeller's one-off training)."""
        steps = max(1, int(summary.get("steps") or 0))
        train_s = float(summary["train_s"])
        ev = summary.get("eval_s") or {}
        per_sample, fixed = _eval_model(float(ev.get("sampling", 0.0)), float(ev.get("quality", 0.0)),
                                        int(summary.get("n_samples") or 1), int(summary.get("fid_reference_size") or 0),
                                        float(ev.get("overfitting", 0.0)))
        eval_s = per_sample * int(summary.get("n_samples") or 1) + fixed
        rest = driver_s - train_s - float(ev.get("classifier", 0.0)) - eval_s
        return cls(s_per_image=train_s / steps / images_per_step, startup_s=max(0.0, rest),
                   eval_per_sample_s=per_sample, eval_fixed_s=fixed)

    def eval_s(self, samples: int) -> float:
        return self.eval_fixed_s + samples * self.eval_per_sample_s

    def run_s(self, steps: int, images_per_step: int, samples: int) -> float:
        return self.startup_s + self.eval_s(samples) + steps * images_per_step * self.s_per_image


def _eval_model(sampling_s: float, quality_s: float, samples: int, reference: int,
                overfitting_s: float = 0.0) -> tuple[float, float]:
    """Evaluation seconds per generated sample and fixed: sampling scales with the samples, the quality metrics
    (features, nearest neighbours, bootstrapped FID) with the samples and the reference pooled; the over-fitting
    measures are fixed (their denoising losses on the data's images dominate)."""
    pooled = max(1, samples + reference)
    return sampling_s / max(1, samples) + quality_s / pooled, quality_s * reference / pooled + overfitting_s


@dataclass(frozen=True)
class Sizes:
    """What the plan sizes: the baseline's and each trial's (and reference's) primal steps, trials, samples."""

    baseline_steps: int
    trial_steps: int
    trials: int
    samples: int


@dataclass(frozen=True)
class Shape:
    """Images per primal step of each kind of run, and the runs besides the trials."""

    baseline: int  # the baseline's (objective batch, plus the monitored constraint batches)
    reference: int  # a reference run's (objective batch)
    trial: int  # the costliest trial's (objective batch + every constraint's)
    references: int  # reference runs trained at the trials' steps
    parallel: int = 1  # trials whose costs overlap (one GPU each); 1 on CPU
    confirm_references: int = 0  # --confirm-seeds: the references' further seeds (runs at the trials' steps)
    confirm_points: int = 0  # and the front's two ends' (trial-shaped runs)


def sweep_cost(tp: Throughput, shape: Shape, s: Sizes, baseline_done: bool = False) -> float:
    """Seconds the runs of ``s`` cost: the baseline (unless done), the references, the trials in waves of
    ``shape.parallel``, the confirmation runs one after another."""
    base = 0.0 if baseline_done else tp.run_s(s.baseline_steps, shape.baseline, s.samples)
    reference = tp.run_s(s.trial_steps, shape.reference, s.samples)
    trial = tp.run_s(s.trial_steps, shape.trial, s.samples)
    return (base + (shape.references + shape.confirm_references) * reference
            + (math.ceil(s.trials / shape.parallel) + shape.confirm_points) * trial)


@dataclass
class Plan:
    """How the sweep spends its budget; ``cut`` says what the budget took away, ``fits`` whether even the floors
    fit."""

    budget_s: float
    used_s: float  # by the time of planning (Ray's start, the calibration; after it: the baseline)
    stage: str  # "before training" or "after the baseline"
    sizes: Sizes
    requested: Sizes
    floors: Sizes
    estimate_s: float  # of the runs still to train
    shape: Shape
    throughput: dict[str, float]
    fits: bool
    cut: str

    @property
    def trial_steps(self) -> int:
        return self.sizes.trial_steps

    @property
    def num_trials(self) -> int:
        return self.sizes.trials

    def describe(self) -> str:
        s, tp, end = self.sizes, self.throughput, self.used_s + self.estimate_s
        runs = (f"baseline {s.baseline_steps} steps, " if self.stage == "before training" else "")
        per_run = Throughput(**tp).eval_s(s.samples)
        confirm = self.shape.confirm_references + self.shape.confirm_points
        trials = f"{s.trials} trials" + (f" and {confirm} confirmation runs" if confirm else "")
        return (f"time budget {self.budget_s / 60:.0f} min, plan {self.stage} ({self.used_s / 60:.1f} min used): "
                f"{runs}{self.shape.references} reference run(s) and {trials} of {s.trial_steps} steps, "
                f"{s.samples} evaluation samples each; estimated {self.estimate_s / 60:.1f} min more (ends by "
                f"~{end / 60:.0f} min; {1 / tp['s_per_image']:.0f} training images/s, {per_run:.0f} s per "
                f"evaluation, {tp['startup_s']:.0f} s per run to start; {self.shape.parallel} trial(s) at a time "
                f"counted as {'sharing the CPUs' if self.shape.parallel == 1 else 'independent'}). {self.cut}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(trial_steps=self.trial_steps, num_trials=self.num_trials)  # what --resume and the report read
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Plan":
        fields = {k: d[k] for k in cls.__dataclass_fields__}
        return cls(**fields | {"sizes": Sizes(**d["sizes"]), "requested": Sizes(**d["requested"]),
                               "floors": Sizes(**d["floors"]), "shape": Shape(**d["shape"])})


def largest(lo: int, hi: int, ok: Callable[[int], bool]) -> int | None:
    """The largest integer in [lo, hi] where ``ok`` holds (``ok`` true up to some point, false after), or None."""
    if hi < lo or not ok(lo):
        return None
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid - 1)
    return lo


def plan(budget_s: float, used_s: float, tp: Throughput, shape: Shape, requested: Sizes, floors: Sizes,
         stage: str = "before training") -> Plan:
    """``sized``'s plan; when even its floors miss the budget with the confirmation runs but fit without them, the
    plan without them (its ``cut`` says so and what keeping them would need): the last thing a budget takes away,
    before it refuses the sweep."""
    p = sized(budget_s, used_s, tp, shape, requested, floors, stage)
    if p.fits or not (shape.confirm_references or shape.confirm_points):
        return p
    bare = sized(budget_s, used_s, tp, replace(shape, confirm_references=0, confirm_points=0), requested, floors,
                 stage)
    if not bare.fits:
        return p
    need = used_s + p.estimate_s / MARGIN
    bare.cut = (f"{bare.cut[:-1]}; no confirmation runs: with them even the smallest sweep needs about "
                f"{need / 60:.0f} min (--time-budget {math.ceil(need / 60)}m keeps them).")
    return bare


def sized(budget_s: float, used_s: float, tp: Throughput, shape: Shape, requested: Sizes, floors: Sizes,
          stage: str = "before training") -> Plan:
    """The largest sweep that fits ``MARGIN`` of ``budget_s - used_s``: the evaluation's samples kept first, then the
    trials, then the steps (see the module's docstring). ``floors``: the smallest of each the plan may choose (equal to
    ``requested`` for what must not change); the baseline's steps follow the trials' by the same share. After the
    baseline (``stage``) its cost is not counted."""
    left = (budget_s - used_s) * MARGIN
    done = stage != "before training"

    def sizes(w: int, n: int, m: int) -> Sizes:
        b = requested.baseline_steps if done else max(1, round(requested.baseline_steps * w / requested.trial_steps))
        return Sizes(baseline_steps=b, trial_steps=w, trials=n, samples=m)

    def fit(w: int, n: int, m: int) -> bool:
        return sweep_cost(tp, shape, sizes(w, n, m), done) <= left

    r, f = requested, floors
    m = largest(f.samples, r.samples, lambda m: fit(f.trial_steps, f.trials, m))
    n = m and largest(f.trials, r.trials, lambda n: fit(f.trial_steps, n, m))
    w = n and largest(f.trial_steps, r.trial_steps, lambda w: fit(w, n, m))
    common = dict(budget_s=budget_s, used_s=used_s, stage=stage, requested=r, floors=f, shape=shape,
                  throughput=asdict(tp))
    if not w:
        s = sizes(f.trial_steps, f.trials, f.samples)
        need = used_s + sweep_cost(tp, shape, s, done) / MARGIN
        cut = (f"even the smallest sweep ({describe_cut(s, r)}) needs about {need / 60:.0f} min with the plan's "
               f"margin: give --time-budget {math.ceil(need / 60)}m or more, a smaller model, or fewer --num-samples.")
        return Plan(sizes=s, estimate_s=sweep_cost(tp, shape, s, done), fits=False, cut=cut, **common)
    if (w, n, m) == (r.trial_steps, r.trials, r.samples):  # all of it fits: the time left buys more trials
        n = largest(n, 64 * n, lambda k: fit(w, k, m))
    s = sizes(w, n, m)
    cut = describe_cut(s, r)
    cut = (f"cut: {cut}." if cut != "as asked" else "nothing cut" + (
        f"; the time left buys {n - r.trials} more trials than --num-samples {r.trials}." if n > r.trials else "."))
    return Plan(sizes=s, estimate_s=sweep_cost(tp, shape, s, done), fits=True, cut=cut, **common)


def describe_cut(s: Sizes, r: Sizes) -> str:
    """What ``s`` took away from ``r``, in words ("as asked" when nothing)."""
    parts = []
    if s.trial_steps < r.trial_steps:
        if s.baseline_steps < r.baseline_steps:
            parts.append(f"the baseline trains {s.baseline_steps} steps instead of {r.baseline_steps}")
        parts.append(f"trials and references train {s.trial_steps} steps instead of {r.trial_steps}")
    if s.trials < r.trials:
        parts.append(f"{s.trials} trials instead of {r.trials}")
    if s.samples < r.samples:
        parts.append(f"{s.samples} evaluation samples instead of {r.samples}")
    return "; ".join(parts) or "as asked"


def replan(first: Plan, tp: Throughput, used_s: float, warm_started: bool) -> Plan:
    """``first`` (made before training) re-checked with ``tp`` as the baseline measured it, at ``used_s``: the trials'
    steps (warm-started: between the first plan's floor and what was asked; from scratch they are the baseline's)
    and count adjusted; the baseline is done and the evaluation's samples stay."""
    s, r, f = first.sizes, first.requested, first.floors
    requested = Sizes(s.baseline_steps, r.trial_steps if warm_started else s.trial_steps, r.trials, s.samples)
    lowest = Sizes(s.baseline_steps, f.trial_steps if warm_started else s.trial_steps, f.trials, s.samples)
    return plan(first.budget_s, used_s, tp, first.shape, requested, lowest, stage="after the baseline")
