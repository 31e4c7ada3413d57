"""Celeb-A and ImageNet-subset tasks on format-faithful fixtures built here: a CelebA folder with the real file
formats, an ImageFolder of PNGs, a tiny randomly initialised AutoencoderKL; each job end to end."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cdd_ray.config import ConfigError, build_config
from cdd_ray.data import load_source, prepare_split
from cdd_ray.tasks import IMAGENETTE_MINORITIES, task_config

ROOT = Path(__file__).resolve().parents[1]
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


def job(name, *args, cwd, timeout=900):
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{cwd / 'mlflow.db'}", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(ROOT / "jobs" / name), *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=timeout)


def test_train_jobs_end_to_end(celeba_root, imagefolder_root, tiny_vae, tmp_path):
    p = job("train_celeba.py", "--root", str(celeba_root), "--preset", "smoke", "--local", "--out",
            str(tmp_path / "celeba"), cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    s = json.loads((tmp_path / "celeba" / "summary.json").read_text())
    assert s["data_source"] == "celeba-Male" and s["class_ids"] == [0, 1] and set(s["lambda"]) == {"class_1"}
    assert Image.open(tmp_path / "celeba" / "samples.png").mode == "RGB"
    p = job("train_imagenet.py", "--root", str(imagefolder_root), "--vae", str(tiny_vae), "--preset", "smoke",
            "--local", "--out", str(tmp_path / "imagenet"), cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    s = json.loads((tmp_path / "imagenet" / "summary.json").read_text())
    assert s["minority_classes"] == [2, 3, 4] and len(s["class_shares"]) == 5
    assert np.load(tmp_path / "imagenet" / "samples.npz")["images"].shape[1:] == (16, 16, 3)  # decoded pixels
    from cdd_ray.sample import generate

    assert generate(tmp_path / "imagenet" / "checkpoint", 3, 2, 0, "cpu").shape == (3, 16, 16, 3)
    p = job("train_imagenet.py", "--root", str(tmp_path / "nope"), "--vae", str(tiny_vae), "--local", cwd=tmp_path)
    assert p.returncode == 2 and "data.root:" in p.stderr and "nope" in p.stderr


def test_tune_jobs_smoke_two_at_once(celeba_root, imagefolder_root, tiny_vae, tmp_path):
    """Both tasks' sweep jobs, started together on this machine, each starting a local Ray of its own (no
    RAY_ADDRESS): both finish, with no fit restarted. (Ray Train's placement-group cleaner looks its cluster up
    through the state API; before each job's Ray carried its own address it found the newest Ray on the machine,
    the other job's: "ConnectionError: Found multiple active Ray instances", and runs ended or restarted.)"""
    args = {"celeba": ["--root", str(celeba_root)],
            "imagenet": ["--root", str(imagefolder_root), "--vae", str(tiny_vae)]}
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"},
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "OMP_NUM_THREADS": "1"}
    procs = {task: subprocess.Popen(
        [sys.executable, str(ROOT / "jobs" / f"tune_{task}.py"), *a, "--smoke", "--num-samples", "1",
         "--warm-start-steps", "0", "--storage", str(tmp_path / "ray"), "--name", f"{task}-sweep"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path, env=env) for task, a in args.items()}
    try:
        outs = {task: p.communicate(timeout=900) for task, p in procs.items()}
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
    for task, (stdout, stderr) in outs.items():
        assert procs[task].returncode == 0, (task, stdout[-3000:], stderr[-3000:])
        assert "Found multiple active Ray instances" not in stderr, (task, stderr[-4000:])
        for summary in (tmp_path / "ray" / f"{task}-sweep").glob("**/summary.json"):  # references and trials
            assert json.loads(summary.read_text()).get("resumed_from_step", 0) == 0, summary
        assert "Pareto front (precision higher is better, tv_to_uniform lower is better" in stdout
        assert "| baseline-rebalanced |" in stdout and "tv_floor" in stdout
        assert (tmp_path / "ray" / f"{task}-sweep" / "front" / "pareto.csv").exists()
