"""The Celeb-A and ImageNet-subset jobs end to end, as a user runs them, on the stand-in datasets of
tests/support/datasets.py."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]


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


def test_a_sweep_and_a_ray_job_at_once_each_on_its_own_ray(celeba_root, imagefolder_root, tiny_vae, tmp_path):
    """The Celeb-A sweep job and the ImageNet-subset training job (on Ray Train, latent diffusion), started
    together on this machine, each starting a local Ray of its own (no RAY_ADDRESS): both finish, with no fit
    restarted. (Ray Train's placement-group cleaner looks its cluster up through the state API; before each job's
    Ray carried its own address it found the newest Ray on the machine, the other job's: "ConnectionError: Found
    multiple active Ray instances", and runs ended or restarted.) The ImageNet-subset sweep job refuses a missing
    data root before any work, as typed."""
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"},
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "OMP_NUM_THREADS": "1"}
    storage = ["--storage", str(tmp_path / "ray")]
    cmds = {"celeba": ["tune_celeba.py", "--root", str(celeba_root), "--preset", "smoke", "--smoke", "--num-samples",
                       "1", "--warm-start-steps", "0", "--name", "celeba-sweep", *storage],
            "imagenet": ["train_imagenet.py", "--root", str(imagefolder_root), "--vae", str(tiny_vae), "--preset",
                         "smoke", "--name", "imagenet-run", "--out", str(tmp_path / "imagenet"), *storage]}
    procs = {task: subprocess.Popen([sys.executable, str(ROOT / "jobs" / c[0]), *c[1:]], stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True, cwd=tmp_path, env=env)
             for task, c in cmds.items()}
    try:
        outs = {task: p.communicate(timeout=900) for task, p in procs.items()}
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
    for task, (stdout, stderr) in outs.items():
        assert procs[task].returncode == 0, (task, stdout[-3000:], stderr[-3000:])
        assert "Found multiple active Ray instances" not in stderr, (task, stderr[-4000:])
    summaries = [*(tmp_path / "ray" / "celeba-sweep").glob("**/summary.json"), tmp_path / "imagenet" / "summary.json"]
    assert len(summaries) >= 4  # the sweep's two references and trial, the training run
    for summary in summaries:
        assert json.loads(summary.read_text()).get("resumed_from_step", 0) == 0, summary
    stdout = outs["celeba"][0]
    assert "Pareto front (precision higher is better, tv_to_uniform lower is better" in stdout
    assert "| baseline-rebalanced |" in stdout and "tv_floor" in stdout
    assert (tmp_path / "ray" / "celeba-sweep" / "front" / "pareto.csv").exists()
    assert json.loads((tmp_path / "imagenet" / "summary.json").read_text())["ray_checkpoint"].startswith(
        str(tmp_path / "ray" / "imagenet-run"))
    p = job("tune_imagenet.py", "--root", str(tmp_path / "nope"), "--vae", str(tiny_vae), "--preset", "smoke",
            *storage, cwd=tmp_path)
    assert p.returncode == 2 and "data.root:" in p.stderr and "nope" in p.stderr, p.stderr[-2000:]
