"""Train one constrained (default) or --unconstrained diffusion model on the imagenet minority task.

A 10-class ImageNet subset (Imagenette) with cassette player, French horn and golf ball as minorities
(paper.md section 4), trained as latent diffusion through a local AutoencoderKL (e.g. sd-vae-ft-mse).

Data: an ImageFolder root, one folder per class (--root, default data/imagenette2/train); weights: a
diffusers AutoencoderKL folder (--vae). docs/DATA.md: Data layouts.

    python jobs/train_imagenet.py --root /data/imagenette2/train --vae /models/sd-vae-ft-mse --local
    python jobs/train_imagenet.py --root /data/imagenette2/train --vae /models/sd-vae-ft-mse --gpu --preset paper
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cdd_ray.cli import train_task_job  # noqa: E402

if __name__ == "__main__":
    train_task_job("imagenet", __doc__)
