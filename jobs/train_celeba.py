"""Train one constrained (default) or --unconstrained diffusion model on the celeba minority task.

Celeb-A with the male minority (paper.md section 4): one constraint makes the model generate men as
often as women although the training set holds 4 women per man. 64x64 RGB pixels.

Data: torchvision's CelebA layout under --root (default data/): celeba/img_align_celeba/*.jpg,
celeba/list_attr_celeba.txt, celeba/list_eval_partition.txt (docs/DATA.md: Data layouts).

    python jobs/train_celeba.py --root /data --local --preset cpu
    python jobs/train_celeba.py --root /data --gpu --preset paper --name celeba-1
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cdd_ray.cli import train_task_job  # noqa: E402

if __name__ == "__main__":
    train_task_job("celeba", __doc__)
