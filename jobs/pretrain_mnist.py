"""Pre-train the model that fine-tuning starts from: unconstrained, on MNIST without digit 9.

    python jobs/pretrain_mnist.py --preset cpu --out runs/pretrained
    python jobs/pretrain_mnist.py --set data.classes=[0,1,2,3,4,5,6,7] --out runs/pretrained-no89

The model is logged to MLflow like every run; fine-tuning jobs take its MLflow run id or the --out
folder as --pretrained.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cdd_ray.cli import add_config_flags, add_ray_flags, check_resume, flag_overrides, job_errors, name_run, run_training  # noqa: E402
from cdd_ray.config import parse_set  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_flags(p, unconstrained=False)
    add_ray_flags(p)
    p.add_argument("--out", default=None, help="output directory (default: runs/<name>)")
    p.add_argument("--local", action="store_true", help="train in this process instead of on Ray Train")
    args = p.parse_args()
    from cdd_ray.finetune import pretrain_config

    with job_errors() as guard:
        check_resume(args)
        cfg = name_run(pretrain_config(args.preset, args.config, parse_set(args.overrides) | flag_overrides(args)),
                       args, "pretrained")
        summary, out = run_training(cfg, args, guard)
    print(f"classes {cfg.data.classes}: shares {[round(s, 3) for s in summary['class_shares']]}, "
          f"fid {summary['fid']:.2f} ({summary['fid_features']} features)")
    print(f"pre-trained model: {Path(out).resolve() / 'checkpoint'}  MLflow run: {summary.get('mlflow_run_id')}")
    print(f"next: python jobs/train_finetune.py --pretrained {Path(out).resolve()}")


if __name__ == "__main__":
    main()
