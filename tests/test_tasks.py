"""Celeb-A and ImageNet-subset tasks (cdd_ray.tasks and their data sources) on the stand-in datasets of
tests/support/datasets.py; their jobs end to end are in tests/e2e/test_task_jobs.py."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from cdd_ray.config import ConfigError, build_config
from cdd_ray.data import load_source, prepare_split
from cdd_ray.tasks import IMAGENETTE_MINORITIES, task_config


@pytest.mark.parametrize("preset", ["smoke", "cpu", "paper"])
@pytest.mark.parametrize("task", ["mnist", "celeba", "imagenet"])
def test_every_task_and_preset_validates(task, preset, celeba_root, imagefolder_root, tmp_path):
    """Every task x preset the README offers resolves to a valid config; ImageNet's latent geometry is that of an
    8x VAE (sd-vae-ft-mse's config), so the paper preset denoises the authors' 32x32 latents."""
    from cdd_ray.config import PRESETS

    assert set(PRESETS) == {"smoke", "cpu", "paper"}  # a new preset joins this test
    sd_vae = tmp_path / "sd-vae-ft-mse"
    sd_vae.mkdir()
    (sd_vae / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL", "latent_channels": 4,
                                                    "block_out_channels": [128, 256, 512, 512]}))
    if task == "mnist":
        cfg = build_config(preset)
    else:
        flags = ({"data.root": str(celeba_root)} if task == "celeba"  # pixels, as the README runs it
                 else {"data.root": str(imagefolder_root), "model.vae": str(sd_vae)})
        cfg = task_config(task, preset, None, flags)
    channels, side = cfg.unet_shape()
    levels = len(cfg.model.channels)
    assert side % 2 ** (levels - 1) == 0 and side >= 2 ** (levels - 1)
    if task == "imagenet" and preset == "paper":
        assert (cfg.data.image_size, channels, side, levels) == (256, 4, 32, 6)


# The authors' settings as paper.md section 5 states them (their public MNIST example), written out here.
AUTHORS = {
    "model.channels": [128, 128, 256, 256, 512, 512], "model.layers_per_block": 2,
    "model.attention_levels": [4],  # the 5th down block and its matching up block
    "model.train_timesteps": 1000,
    "optim.lr": 1e-4, "optim.warmup": 500, "optim.grad_clip": 1.0, "optim.precision": "fp16",
    "optim.batch_size": 128, "optim.constraint_batch_size": 64, "dual.primal_steps": 2,
    "eval.n_samples": 15000, "eval.fid_features": "auto",  # clean-fid's Inception when its weights are on disk
}
AUTHORS_MINORITY = {"dual.kind": "resilient", "dual.gamma": 0.085, "dual.b": [0.0], "dual.eta_schedule": "follow_lr"}
AUTHORS_TASK = {
    "mnist": {"data.image_size": 32, "data.per_class": 256, "data.minority_count": 64,
              "data.minority_classes": [4, 5, 7]},
    "celeba": {"data.attribute": "Male", "data.minority_classes": [1], "data.mix": "natural"},  # Celeb-A's own mix
    "imagenet": {"data.image_size": 256, "data.minority_names": IMAGENETTE_MINORITIES},  # 32x32 latents of an 8x VAE
    "finetune": {"data.classes": list(range(10)), "finetune.new_classes": [9], "dual.kind": "plain"},
}


@pytest.mark.parametrize("task", ["mnist", "celeba", "imagenet", "finetune"])
def test_paper_preset_is_the_authors_setting_field_by_field(task, celeba_root, imagefolder_root, tmp_path):
    from cdd_ray.config import flatten
    from cdd_ray.finetune import finetune_config, pretrain_config

    sd_vae = tmp_path / "sd-vae-ft-mse"
    sd_vae.mkdir()
    (sd_vae / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL", "latent_channels": 4,
                                                    "block_out_channels": [128, 256, 512, 512]}))
    if task == "mnist":
        cfg = build_config("paper")
    elif task == "finetune":  # a paper-preset pre-training run's checkpoint folder (its config and a unet/)
        ckpt = tmp_path / "pretrained"
        (ckpt / "unet").mkdir(parents=True)
        (ckpt / "config.json").write_text(json.dumps(pretrain_config("paper", None, {}).to_dict()))
        cfg = finetune_config(ckpt, None, None, {}, None)
    else:
        flags = ({"data.root": str(celeba_root)} if task == "celeba"
                 else {"data.root": str(imagefolder_root), "model.vae": str(sd_vae)})
        cfg = task_config(task, "paper", None, flags)
    got = flatten(cfg.to_dict())
    want = {**AUTHORS, **({} if task == "finetune" else AUTHORS_MINORITY), **AUTHORS_TASK[task]}
    assert {k: got[k] for k in want} == want
    if task != "finetune":  # the dual step is 1000 x the current primal learning rate
        assert cfg.dual.eta / cfg.optim.lr == pytest.approx(1000)
    if task == "imagenet":
        assert cfg.unet_shape() == (4, 32)


def test_celeba_source_reads_the_layout(celeba_root):
    cfg = task_config("celeba", "smoke", None, {"data.root": str(celeba_root)})
    src = load_source(cfg.data)
    assert src.name == "celeba-Male" and len(src.labels) == 64  # the validation partition is left out
    assert np.bincount(src.labels).tolist() == [40, 24]
    x = src.images[np.array([0, 5])]
    assert x.shape == (2, 3, 16, 16) and x.dtype == np.uint8
    split = prepare_split(cfg)
    assert split.objective.shape[1:] == (3, 16, 16) and set(split.constraints) == {"class_1"}
    assert split.constraints["class_1"].shape[0] == 8 and split.priors == pytest.approx([24 / 32, 8 / 32])


def test_celeba_errors_name_the_missing_file_or_field(celeba_root, tmp_path):
    with pytest.raises(ConfigError, match="has no celeba/ folder"):
        task_config("celeba", "smoke", None, {"data.root": str(tmp_path)})
    with pytest.raises(ConfigError, match=r"data.attribute: 'Bald' is not a column .* allowed: 5_o_Clock_Shadow"):
        load_source(task_config("celeba", "smoke", None, {"data.root": str(celeba_root),
                                                           "data.attribute": "Bald"}).data)
    broken = tmp_path / "broken"
    (broken / "celeba" / "img_align_celeba").mkdir(parents=True)
    (broken / "celeba" / "list_eval_partition.txt").write_text("000001.jpg 0\n")
    with pytest.raises(ConfigError, match=r"Celeb-A files missing: .*list_attr_celeba.txt"):
        load_source(task_config("celeba", "smoke", None, {"data.root": str(broken)}).data)
    (broken / "celeba" / "list_attr_celeba.txt").write_text("1\nMale\n000001.jpg 1\n")
    with pytest.raises(ConfigError, match=r"images listed in .*list_eval_partition.txt are missing .*000001.jpg"):
        load_source(task_config("celeba", "smoke", None, {"data.root": str(broken)}).data)


def test_imagefolder_minorities_by_folder_name(imagefolder_root, tiny_vae):
    cfg = task_config("imagenet", "smoke", None, {"data.root": str(imagefolder_root), "model.vae": str(tiny_vae)})
    assert cfg.data.minority_classes == [2, 3, 4] and cfg.unet_shape() == (4, 8)
    with pytest.raises(ConfigError, match=r"data.minority_names: \['n99'\] are not class folders .* allowed: n01440764"):
        task_config("imagenet", "smoke", None, {"data.root": str(imagefolder_root), "model.vae": str(tiny_vae),
                                                "data.minority_names": ["n99"]})
    with pytest.raises(ConfigError, match="model.vae: the ImageNet task is latent diffusion"):
        task_config("imagenet", "smoke", None, {"data.root": str(imagefolder_root)})
    with pytest.raises(ConfigError, match="model.vae: '/nope' is not a diffusers AutoencoderKL folder"):
        task_config("imagenet", "smoke", None, {"data.root": str(imagefolder_root), "model.vae": "/nope"})
    with pytest.raises(ConfigError, match=r"data.root: '/nope' does not exist .* one folder of images per class"):
        build_config("smoke", overrides={"data.dataset": "imagefolder", "data.root": "/nope"})
    with pytest.raises(ConfigError, match=r"data.image_size: 10 must be divisible by 4 \(.* x the VAE's downsampling 2\)"):
        task_config("imagenet", "smoke", None, {"data.root": str(imagefolder_root), "model.vae": str(tiny_vae),
                                                "data.image_size": 10})


def test_empty_class_folder_is_named(tmp_path):
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "a" / "x.png")
    cfg = build_config("smoke", overrides={"data.dataset": "imagefolder", "data.root": str(tmp_path),
                                           "data.classes": [0, 1], "data.minority_classes": [1]})
    with pytest.raises(ConfigError, match=r"class folder '.*/b' has no images"):
        load_source(cfg.data)


def test_latents_are_encoded_once_and_cached(imagefolder_root, tiny_vae, monkeypatch, tmp_path):
    import cdd_ray.model as model

    monkeypatch.setenv("CDD_RAY_CACHE", str(tmp_path / "cache"))
    calls = []
    real = model.encode
    monkeypatch.setattr(model, "encode", lambda vae, x, **k: calls.append(x.shape[0]) or real(vae, x, **k))
    cfg = task_config("imagenet", "smoke", None, {"data.root": str(imagefolder_root), "model.vae": str(tiny_vae)})
    a = prepare_split(cfg)
    b = prepare_split(cfg)
    assert calls == [2 * 12 + 3 * 4]  # once: the second split came from the cache
    assert a.objective.shape == (36, 4, 8, 8) and torch.equal(a.objective, b.objective)
    assert a.constraints["class_2"].shape == (4, 4, 8, 8) and a.reference.shape[1:] == (3, 16, 16)


