"""Format-faithful stand-ins for the datasets the tasks read, built here (nothing is downloaded): a CelebA folder
with the real file formats, an ImageFolder of PNGs and JPEGs, a tiny randomly initialised AutoencoderKL. Fixtures,
made available to every test module by tests/conftest.py."""

import numpy as np
import pytest
import torch
from PIL import Image

from cdd_ray.tasks import IMAGENETTE_MINORITIES

ATTRS = ["5_o_Clock_Shadow", "Arched_Eyebrows", "Male", "Young"]
IMAGENETTE = ["n01440764", "n02102040", *IMAGENETTE_MINORITIES]


@pytest.fixture(scope="module")
def celeba_root(tmp_path_factory):
    """40 women and 24 men in the training partition, 5 more images in the validation partition."""
    root = tmp_path_factory.mktemp("celeba_data")
    base = root / "celeba"
    (base / "img_align_celeba").mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows, parts = [], []
    for i in range(69):
        name = f"{i + 1:06d}.jpg"
        male = i % 8 < 3 if i < 64 else True
        img = rng.integers(0, 256, (218, 178, 3), dtype=np.uint8)
        img[..., 2 if male else 0] = 255  # something a classifier can learn
        Image.fromarray(img).save(base / "img_align_celeba" / name, quality=90)
        values = [rng.choice([-1, 1]), rng.choice([-1, 1]), 1 if male else -1, 1]
        rows.append(f"{name} " + " ".join(f"{v:2d}" for v in values))
        parts.append(f"{name} {0 if i < 64 else 1}")
    (base / "list_attr_celeba.txt").write_text(f"{len(rows)}\n" + " ".join(ATTRS) + "\n" + "\n".join(rows) + "\n")
    (base / "list_eval_partition.txt").write_text("\n".join(parts) + "\n")
    return root


@pytest.fixture(scope="module")
def imagefolder_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagenette") / "train"
    rng = np.random.default_rng(1)
    for k, name in enumerate(IMAGENETTE):
        (root / name).mkdir(parents=True)
        for i in range(20):
            img = rng.integers(0, 256, (24, 20, 3), dtype=np.uint8)
            img[:, :, k % 3] = 40 * k
            Image.fromarray(img).save(root / name / f"{name}_{i}.JPEG" if i % 2 else root / name / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        layers_per_block=1, norm_num_groups=4, sample_size=16)
    path = tmp_path_factory.mktemp("vae")
    vae.save_pretrained(path)
    return path
