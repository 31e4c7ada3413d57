"""Fine-tune a pre-trained model on a new digit while staying close to it (paper.md section 4).

    python jobs/train_finetune.py --pretrained runs/pretrained --out runs/finetune
    python jobs/train_finetune.py --pretrained runs/pretrained --unconstrained --out runs/finetune-free
    python jobs/train_finetune.py --pretrained 3f2a...(MLflow run id) --set dual.b=0.02 --set finetune.new_count=32

--pretrained takes a checkpoint folder, a run's --out folder or an MLflow run id (its model is fetched
from the tracking server). Data and model settings come from the pre-trained run.
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cdd_ray.cli import add_config_flags, add_ray_flags, check_resume, flag_overrides, job_errors, name_run, run_training  # noqa: E402
from cdd_ray.config import parse_set  # noqa: E402

KEYS = ("new_share", "old_share", "forgetting", "old_tv_to_pretrained", "class_shares", "pretrained_shares", "fid",
        "train_loss_new", "heldout_loss_new", "distance_to_pretrained", "lambda", "wall_s")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_flags(p)
    add_ray_flags(p)
    p.add_argument("--pretrained", required=True, help="checkpoint folder, run output folder or MLflow run id")
    p.add_argument("--out", default=None, help="output directory (default: runs/<name>)")
    p.add_argument("--local", action="store_true", help="train in this process instead of on Ray Train")
    args = p.parse_args()
    from cdd_ray.finetune import finetune_config, resolve_pretrained

    with job_errors() as guard:
        check_resume(args)
        cfg = finetune_config(resolve_pretrained(args.pretrained), args.preset, args.config,
                              parse_set(args.overrides) | flag_overrides(args), args.unconstrained)
        cfg = name_run(cfg, args, "finetune-free" if cfg.unconstrained else "finetune")
        summary, out = run_training(cfg, args, guard)
    print(json.dumps({k: summary.get(k) for k in KEYS}, indent=2))
    print(f"wrote {Path(out).resolve()}")


if __name__ == "__main__":
    main()
