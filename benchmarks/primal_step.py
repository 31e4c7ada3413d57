"""Primal step throughput: cdd-ray's fused forward vs one forward per dataset vs an unconstrained step.

For K constraints a step sees an objective batch of B images and K constraint batches of C images.
- fused:        cdd-ray: ONE UNet forward over the concatenated B + K*C images, per-dataset losses from
                its segments, one backward of the Lagrangian (``cdd_ray.core.losses.fused_losses``);
- per-dataset:  the authors' approach: K + 1 forwards (one per dataset), one backward of the Lagrangian;
- unconstrained: one forward over the same B + K*C images, one plain mean loss.
Every step includes zero_grad, backward, gradient clipping and the AdamW step. Modes are interleaved
(order rotates each repeat) in one process; reported: images/s (median over repeats) and per-image ratios.

    python benchmarks/primal_step.py                      # cpu preset, K = 1, 3, 10
    python benchmarks/primal_step.py --preset paper --device cuda --channels-last
"""

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from cdd_ray.config import build_config  # noqa: E402
from cdd_ray.model import build_noise_scheduler, build_unet, n_params  # noqa: E402
from cdd_ray.model import autocast_for  # noqa: E402
from cdd_ray.core.losses import fused_losses  # noqa: E402

MODES = ("fused", "per-dataset", "unconstrained")


def make_step(mode, unet, sched, opt, amp, batches, lam, gen):
    def step():
        with amp:
            if mode == "fused":
                losses = fused_losses(unet, sched, batches, gen)
            elif mode == "per-dataset":
                losses = [fused_losses(unet, sched, [b], gen)[0] for b in batches]
            else:
                losses = fused_losses(unet, sched, [torch.cat(batches)], gen)
        if mode == "unconstrained":
            loss = losses[0]
        else:
            stacked = torch.stack(losses)
            loss = stacked[0] + (lam * stacked[1:]).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
    return step


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="cpu")
    p.add_argument("--constraints", default="1,3,10", help="comma-separated K values")
    p.add_argument("--batch", type=int, default=128, help="objective images per step (B)")
    p.add_argument("--constraint-batch", type=int, default=64, help="images per constraint per step (C)")
    p.add_argument("--steps", type=int, default=6, help="timed steps per mode per repeat")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32"],
                   help="auto: what training uses (bf16 autocast on GPUs that support it); fp32: no autocast")
    p.add_argument("--compile", action="store_true", help="torch.compile the UNet")
    p.add_argument("--modes", default=",".join(MODES), help="subset of: " + ", ".join(MODES))
    p.add_argument("--threads", type=int, default=0, help="torch threads on CPU (0: torch's default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cfg = build_config(args.preset)
    size = cfg.data.image_size
    amp = autocast_for(device)[0] if args.precision == "auto" else contextlib.nullcontext()
    modes = tuple(m for m in MODES if m in args.modes.split(","))
    print(f"preset {args.preset}: UNet {list(cfg.model.channels)} at {size}x{size}, "
          f"{n_params(build_unet(cfg.model, size)) / 1e6:.2f}M params; device {device}"
          f"{' (' + torch.cuda.get_device_name(device) + ')' if device.type == 'cuda' else ''}; "
          f"threads {torch.get_num_threads()}; B={args.batch}, C={args.constraint_batch}; "
          f"{args.steps} steps x {args.repeats} repeats per mode; channels_last={args.channels_last}; "
          f"precision {args.precision}{' (bf16 autocast)' if args.precision == 'auto' and device.type == 'cuda' else ''}; "
          f"compile={args.compile}; "
          f"torch {torch.__version__}")
    print()
    print("| K | images/step | fused img/s | per-dataset img/s | unconstrained img/s | fused / unconstrained "
          "(time per image) | per-dataset / fused (time per image) |")
    print("|---|---|---|---|---|---|---|")
    results = {}
    for k in [int(v) for v in args.constraints.split(",")]:
        torch.manual_seed(0)
        unet = build_unet(cfg.model, size).to(device)
        if args.channels_last:
            unet = unet.to(memory_format=torch.channels_last)
        model = torch.compile(unet) if args.compile else unet
        opt = torch.optim.AdamW(unet.parameters(), lr=1e-4)
        sched = build_noise_scheduler(cfg.model)
        g = torch.Generator().manual_seed(1)
        batches = [torch.rand(args.batch, 1, size, size, generator=g).mul(2).sub(1).to(device)]
        batches += [torch.rand(args.constraint_batch, 1, size, size, generator=g).mul(2).sub(1).to(device)
                    for _ in range(k)]
        n_img = sum(b.shape[0] for b in batches)
        lam = torch.full((k,), 0.5, device=device)
        gen = torch.Generator(device=device).manual_seed(2)
        steps = {m: make_step(m, model, sched, opt, amp, batches, lam, gen) for m in modes}
        for m in modes:  # warm-up: allocator, kernels, compilation
            steps[m]()
            steps[m]()
        sync(device)
        times = {m: [] for m in modes}
        for r in range(args.repeats):
            order = modes[r % len(modes):] + modes[:r % len(modes)]
            for m in order:
                sync(device)
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    steps[m]()
                sync(device)
                times[m].append((time.perf_counter() - t0) / args.steps)
        med = {m: statistics.median(v) for m, v in times.items()}
        ips = {m: f"{n_img / med[m]:.0f}" if m in med else "-" for m in MODES}

        def ratio(a, b):
            return f"{med[a] / med[b]:.3f}" if a in med and b in med else "-"

        results[k] = med
        print(f"| {k} | {n_img} | {ips['fused']} | {ips['per-dataset']} | {ips['unconstrained']} | "
              f"{ratio('fused', 'unconstrained')} | {ratio('per-dataset', 'fused')} |", flush=True)
    print()
    if set(MODES) <= set(modes):
        worst = max(r["fused"] / r["unconstrained"] for r in results.values())
        print(f"goal fused <= 1.10x unconstrained per image: worst {worst:.3f} -> "
              f"{'met' if worst <= 1.10 else 'NOT met'}")
        for k, r in results.items():
            if k >= 3:
                print(f"goal fused faster than per-dataset at K={k}: {r['per-dataset'] / r['fused']:.2f}x -> "
                      f"{'met' if r['fused'] < r['per-dataset'] else 'NOT met'}")


if __name__ == "__main__":
    main()
