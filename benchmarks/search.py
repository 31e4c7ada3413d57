"""Which Optuna sampler searches within the default budget? Front hypervolume after the same number of trials.

A cheap version of the default sweep (``python jobs/tune_mnist.py``): the real search space
(search_spaces/mnist_minority.yaml), the real trial (``cdd_ray.sweep.space.trial_config``: derived keys, ``dual.b_rel``
from the baseline's live per-class losses; the pure primal-dual loop; the full evaluation), warm-started from one
unconstrained baseline as the sweep's trials are, and the sweep's two objectives (precision up, tv_to_uniform
down). What is cheaper: an 8x8 UNet (16, 32, 32), a 64-image objective batch, shorter runs, 500 samples at
DDIM 10, no bootstrap, trials one after another in this process (no Ray: the sweep runs them 2 at a time,
which gives a sampler less to learn from, not more). The real data: 256 images per majority digit, 64 per
minority digit (4, 5, 7).

For every seed the samplers run interleaved (seed 0: tpe, gp, random; seed 1: ...); each study's trial
training is seeded alike, so the samplers differ only in the parameters they propose. Hypervolume of the
trials' Pareto front (cdd_ray.front.hypervolume) with the reference point precision 0, tv_to_uniform 0.9 (the tv
of a generator that draws one class only), after 4 and after 8 trials.

ASHA as the sweep runs it (``--asha``, the default): one rung at half the trial (the sweep's grace period, on a
multiple of its report window of steps // 8), reduction factor 3, on ``asha_loss`` (the window's mean loss over
the objective and every constraint dataset; here the mean of the history's ``loss_mean`` over the window's
blocks). Ray's rule with trials one after another: a trial continues when its loss is among the best third of
the losses recorded at the rung so far (the first always continues). A stopped trial is told to Optuna as
PRUNED (what the sweep's ConstrainedOptunaSearch does) and has no point on the front; it is still trained to its
end here (its result is cached for the other samplers), which costs time but not fidelity.

    python benchmarks/search.py                      # tpe, gp, random x seeds 0-3, 8 trials: ~16 min here
    python benchmarks/search.py --samplers tpe,random --seeds 0,1,2 --trials 8
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cdd_ray.config import build_config  # noqa: E402
from cdd_ray.front import hypervolume  # noqa: E402
from cdd_ray.runner import run_local  # noqa: E402
from cdd_ray.samplers import SAMPLERS, make_sampler  # noqa: E402
from cdd_ray.metrics import OBJECTIVES  # noqa: E402
from cdd_ray.sweep.references import live_class_losses  # noqa: E402
from cdd_ray.sweep.space import load_space, trial_config  # noqa: E402

REF = (0.0, 0.9)  # (precision, tv_to_uniform): the worst of each
CHEAP = {  # the smoke preset's 8x8 UNet, a little wider; the real task's data sizes
    "data.per_class": 256, "data.minority_count": 64, "data.classifier_test_per_class": 50,
    "data.reference_per_class": 100, "model.channels": [16, 32, 32], "optim.batch_size": 64,
    "optim.constraint_batch_size": 8, "optim.warmup": 50, "eval.n_samples": 500, "eval.sampler_steps": 10,
    "eval.batch_size": 500, "eval.classifier_epochs": 8, "eval.bootstrap": 0, "eval.class_fid_samples": 10,
}


def suggest(trial, space) -> dict:
    """The search space file's distributions as Optuna suggestions (as Ray's OptunaSearch converts them)."""
    out = {}
    for key, dist in space.params.items():
        kind, args = next(iter(dist.items()))
        if kind == "choice":
            out[key] = trial.suggest_categorical(key, args)
        elif kind == "randint":
            out[key] = trial.suggest_int(key, args[0], args[1] - 1)
        else:
            out[key] = trial.suggest_float(key, args[0], args[1], log=kind == "loguniform")
    return out


def baseline(out: Path, steps: int, names: list[str]) -> tuple[dict, dict]:
    """The unconstrained baseline (live constraint losses monitored, as in the sweep): its summary and losses."""
    cfg = build_config("smoke", None, {**CHEAP, "optim.steps": steps, "optim.monitor_constraints": True,
                                       "eval.classifier_cache": str(out / "classifiers")}, True)
    summary = json.loads((out / "baseline" / "summary.json").read_text()) if (out / "baseline" / "summary.json").exists() \
        else run_local(cfg, out / "baseline", progress=False, track=False)
    return summary, live_class_losses(out / "baseline" / "history.json", names)


def rung_loss(history_file: Path, rung: int, every: int) -> float:
    """The trial's ``asha_loss`` at the rung: the mean ``loss_mean`` of the dual blocks (steps (previous block's
    step, step]) that overlap the report window (rung - every, rung]."""
    history = json.loads(history_file.read_text())
    starts = [0] + [h["step"] for h in history[:-1]]
    blocks = [h["loss_mean"] for h, start in zip(history, starts) if h["step"] > rung - every and start < rung]
    return sum(blocks) / len(blocks)


def asha_stops(loss: float, recorded: list[float]) -> bool:
    """Ray's ASHA bracket (mode min: rewards are -loss): stop when the reward is under the (1 - 1/3) percentile
    of the rewards recorded at the rung so far."""
    return bool(recorded) and bool(-loss < np.nanpercentile([-x for x in recorded], (1 - 1 / 3) * 100))


def study(sampler: str, seed: int, args, space, base: dict, losses: dict, out: Path, cache: dict) -> list[dict]:
    """One Optuna study of ``args.trials`` trials. ``cache``: results by parameters (a trial's training and
    evaluation are seeded, so the same parameters give the same result: the samplers of one seed share their
    random start-up trials, which are trained once)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    s = optuna.create_study(directions=["maximize", "minimize"], sampler=make_sampler(sampler, seed))
    rows, recorded = [], []
    every = max(1, args.trial_steps // 8)
    rung = max(every, args.trial_steps // 2 // every * every)

    def objective(trial):
        params = suggest(trial, space)
        key = json.dumps(params, sort_keys=True)
        t = time.perf_counter()
        if key not in cache:
            cfg = trial_config(base, params, losses)
            folder = out / f"{sampler}-s{seed}" / f"t{trial.number}"
            cache[key] = run_local(cfg, folder, progress=False, track=False) | {
                "rung_loss": rung_loss(folder / "history.json", rung, every)}
        summary = cache[key]
        pruned = args.asha and asha_stops(summary["rung_loss"], recorded)
        recorded.append(summary["rung_loss"])
        rows.append({o: summary[o] for o in OBJECTIVES} | {"minority_share": summary["minority_share"],
                                                           "params": params, "s": time.perf_counter() - t,
                                                           "rung_loss": summary["rung_loss"], "pruned": pruned})
        if pruned:
            raise optuna.TrialPruned()
        return tuple(summary[o] for o in OBJECTIVES)

    s.optimize(objective, n_trials=args.trials)
    return rows


def front_hv(rows: list[dict]) -> float:
    """Hypervolume of the trials that finished (an ASHA-stopped trial has no evaluated point in the sweep)."""
    return hypervolume([r for r in rows if not r["pruned"]], OBJECTIVES, REF)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samplers", default="tpe,gp,random", help=f"comma-separated, from {', '.join(SAMPLERS)}")
    p.add_argument("--seeds", default="0,1,2,3", help="comma-separated sampler seeds")
    p.add_argument("--trials", type=int, default=8, help="trials per study (the default sweep's 8)")
    p.add_argument("--baseline-steps", type=int, default=1500)
    p.add_argument("--trial-steps", type=int, default=200, help="warm-started steps per trial")
    p.add_argument("--asha", action=argparse.BooleanOptionalAction, default=True,
                   help="stop trials as the sweep's ASHA does and tell them PRUNED (default on)")
    p.add_argument("--out", default="runs/bench-search")
    args = p.parse_args()
    samplers, seeds = args.samplers.split(","), [int(s) for s in args.seeds.split(",")]
    out = Path(args.out).resolve()
    space = load_space(Path(__file__).resolve().parents[1] / "search_spaces" / "mnist_minority.yaml")
    t0 = time.perf_counter()
    names = [f"class_{c}" for c in (4, 5, 7)]
    ref_summary, losses = baseline(out, args.baseline_steps, names)
    base = build_config("smoke", None, {**CHEAP, "optim.steps": args.trial_steps, "eval.classifier_cache":
                                        str(out / "classifiers"),
                                        "optim.init_from": str(out / "baseline" / "checkpoint"),
                                        "optim.warmup": args.trial_steps // 10}).to_dict()
    print(f"settings: samplers {samplers}, seeds {seeds}, {args.trials} trials, ASHA {args.asha}, baseline {args.baseline_steps} steps "
          f"(precision {ref_summary['precision']:.3f}, tv {ref_summary['tv_to_uniform']:.3f}), trials "
          f"{args.trial_steps} warm steps, {CHEAP}", flush=True)
    results: dict[str, dict[int, list[dict]]] = {s: {} for s in samplers}
    for seed in seeds:
        cache: dict[str, dict] = {}
        for sampler in samplers:
            rows = study(sampler, seed, args, space, base, losses, out, cache)
            results[sampler][seed] = rows
            hv = [front_hv(rows[:n]) for n in (args.trials // 2, args.trials)]
            print(f"seed {seed} {sampler}: hypervolume after {args.trials // 2} / {args.trials} trials "
                  f"{hv[0]:.4f} / {hv[1]:.4f}; {sum(r['pruned'] for r in rows)} pruned by ASHA; "
                  f"{sum(r['s'] > 1 for r in rows)} trials trained, "
                  f"{sum(r['s'] for r in rows):.0f} s", flush=True)
            (out / "results.json").write_text(json.dumps(results, indent=1))
    print(f"\nwall {time.perf_counter() - t0:.0f} s. Hypervolume (ref precision {REF[0]}, tv {REF[1]}); baseline "
          f"point alone: {hypervolume([ref_summary], OBJECTIVES, REF):.4f}")
    print(f"| sampler | median after {args.trials // 2} | median after {args.trials} | per seed after {args.trials} "
          "| best precision with tv <= 0.1 (median) |")
    print("|---|---|---|---|---|")
    for sampler in samplers:
        per = [results[sampler][s] for s in seeds]
        h4 = statistics.median(front_hv(r[:args.trials // 2]) for r in per)
        h8 = [front_hv(r) for r in per]
        fair = [max([x["precision"] for x in r if x["tv_to_uniform"] <= 0.1 and not x["pruned"]],
                    default=float("nan")) for r in per]
        print(f"| {sampler} | {h4:.4f} | {statistics.median(h8):.4f} | {', '.join(f'{h:.4f}' for h in h8)} | "
              f"{statistics.median(fair):.3f} |")


if __name__ == "__main__":
    main()
