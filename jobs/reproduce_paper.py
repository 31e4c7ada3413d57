"""Reproduce one of the paper's experiments: its unconstrained / constrained pair, at the same budget, with the
same evaluation, under one MLflow parent run; writes OUT/reproduction.md (the paper's numbers beside the
measured ones, the feature space, class shares measured vs predicted, the lambda plot).

    python jobs/reproduce_paper.py --task mnist --scale paper --gpu           # the real reproduction (GPU)
    python jobs/reproduce_paper.py --task mnist --scale cpu --local           # MNIST at the cpu preset
    python jobs/reproduce_paper.py --task finetune --scale cpu --local
    python jobs/reproduce_paper.py --task celeba --root /data --scale paper --gpu
    python jobs/reproduce_paper.py --task imagenet --root /data/imagenette2/train --vae /models/sd-vae-ft-mse --gpu
    python jobs/reproduce_paper.py --task mnist --scale smoke --local         # the machinery, in seconds

--scale paper / cpu / smoke picks the preset of that name (docs/CONFIGURATION.md: the paper preset).
"""

import argparse
import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cdd_ray.cli import add_ray_flags, add_task_flags, flag_overrides, job_errors, setup_logging  # noqa: E402
from cdd_ray.config import ConfigError, parse_set  # noqa: E402
from cdd_ray.reproduce import SCALES, TASKS, reproduce  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", required=True, choices=TASKS, help="the paper's experiment (paper.md section 4)")
    p.add_argument("--scale", default="cpu", choices=sorted(SCALES), help="preset: paper (GPUs), cpu, smoke")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config field of every run, e.g. --set optim.steps=3000 (repeatable)")
    p.add_argument("--name", default=None, help="prefix of the runs' names (default: reproduce-<task>-<scale>-<time>)")
    p.add_argument("--out", default=None, help="output directory (default: runs/<name>)")
    p.add_argument("--local", action="store_true", help="train in this process instead of on Ray Train")
    add_ray_flags(p)
    add_task_flags(p)
    args = p.parse_args()
    from cdd_ray.runner import run_local, run_ray

    name = args.name or f"reproduce-{args.task}-{args.scale}-{time.strftime('%Y%m%d-%H%M%S')}"
    with job_errors():
        if args.resume:
            raise ConfigError("--resume: a reproduction starts anew (each of its runs is a normal run: continue one "
                              "with jobs/train_*.py --resume --name <its name>)")
        setup_logging()
        overrides = parse_set(args.overrides) | {k: v for k, v in flag_overrides(args).items() if k != "name"}
        train = run_local if args.local else (lambda cfg, out, **kw: run_ray(cfg, out, verbose=args.verbose, **kw))
        reproduce(args.task, args.scale, args.out or f"runs/{name}", overrides, name, train,
                  command=shlex.join(["python", "jobs/reproduce_paper.py", *sys.argv[1:]]))
    out = Path(args.out or f"runs/{name}").resolve()
    text = (out / "reproduction.md").read_text()
    print(text[text.index("## FID"):text.index("## Class shares")].strip())
    print(f"\nwrote {out / 'reproduction.md'}")


if __name__ == "__main__":
    main()
