"""Peak memory of a fused constrained primal step vs number of constraints K and batch sizes.

Each configuration runs in a fresh subprocess (peak memory is per process): build the preset's UNet and
AdamW, run 3 fused steps (``cdd_ray.core.losses.fused_losses`` + backward + optimiser step) and report
- CUDA: ``torch.cuda.max_memory_allocated`` (tensors only);
- CPU: peak resident set size minus the resident size just before the first step (activations,
  gradients, optimiser state and allocator slack of the step).

    python benchmarks/memory.py
    python benchmarks/memory.py --preset paper --device cuda
"""

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def measure(preset: str, k: int, batch: int, cbatch: int, device: str) -> dict:
    import psutil
    import torch

    from cdd_ray.config import build_config
    from cdd_ray.model import build_noise_scheduler, build_unet
    from cdd_ray.model import autocast_for
    from cdd_ray.core.losses import fused_losses

    dev = torch.device(device)
    cfg = build_config(preset)
    size = cfg.data.image_size
    unet = build_unet(cfg.model, size).to(dev)
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-4)
    sched = build_noise_scheduler(cfg.model)
    amp, _ = autocast_for(dev)
    batches = [torch.rand(batch, 1, size, size, device=dev)] + [torch.rand(cbatch, 1, size, size, device=dev)
                                                                 for _ in range(k)]
    lam = torch.full((k,), 0.5, device=dev)
    gen = torch.Generator(device=dev).manual_seed(0)
    before = psutil.Process().memory_info().rss
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    for _ in range(3):
        with amp:
            losses = torch.stack(fused_losses(unet, sched, batches, gen))
        loss = losses[0] + (lam * losses[1:]).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        return {"peak_mib": torch.cuda.max_memory_allocated(dev) / 2**20, "what": "CUDA max allocated"}
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    return {"peak_mib": (peak - before) / 2**20, "what": "CPU peak RSS above the pre-step RSS"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="cpu")
    p.add_argument("--device", default=None)
    p.add_argument("--constraints", default="0,1,3,10")
    p.add_argument("--batches", default="64:32,128:64,256:128", help="B:C pairs (objective:per-constraint)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(measure(**json.loads(args.child))))
        return
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    print(f"preset {args.preset}; device {device}; 3 fused steps per configuration, each in its own process")
    print()
    print("| K | B | C | images/step | peak MiB | measured as |")
    print("|---|---|---|---|---|---|")
    for pair in args.batches.split(","):
        b, c = (int(v) for v in pair.split(":"))
        for k in (int(v) for v in args.constraints.split(",")):
            spec = {"preset": args.preset, "k": k, "batch": b, "cbatch": c, "device": device}
            out = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True,
                                 text=True, check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"| {k} | {b} | {c} | {b + k * c} | {r['peak_mib']:.0f} | {r['what']} |", flush=True)


if __name__ == "__main__":
    main()
