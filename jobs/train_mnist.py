"""Train one constrained (default) or unconstrained diffusion model on imbalanced MNIST with Ray Train.

    python jobs/train_mnist.py --preset cpu --out runs/constrained
    python jobs/train_mnist.py --preset cpu --unconstrained --out runs/baseline
    python jobs/train_mnist.py --preset cpu --baseline runs/baseline   # theory check with the baseline's shares
    python jobs/train_mnist.py --workers 2 --gpu --preset paper --name paper-1 --storage /shared/cdd
    python jobs/train_mnist.py --name paper-1 --resume ...       # continue from its latest checkpoint
    python jobs/train_mnist.py --local ...                        # no Ray: one process
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cdd_ray.cli import (SUMMARY_KEYS, add_baseline_flag, add_config_flags, add_ray_flags, config_from_args,  # noqa: E402
                         job_errors, run_training)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_flags(p)
    add_baseline_flag(p)
    add_ray_flags(p)
    p.add_argument("--out", default=None, help="output directory (default: runs/<name>)")
    p.add_argument("--local", action="store_true", help="train in this process instead of on Ray Train")
    args = p.parse_args()
    cfg = config_from_args(args)
    with job_errors() as guard:
        summary, out = run_training(cfg, args, guard)
    print(json.dumps({k: summary.get(k) for k in SUMMARY_KEYS}, indent=2))
    print(f"wrote {Path(out).resolve()}")


if __name__ == "__main__":
    main()
