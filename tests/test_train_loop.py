import dataclasses
import math

import pytest
import torch

from cdd_ray import checkpoint
from cdd_ray.checkpoint import Snapshot
from cdd_ray.config import build_config
from cdd_ray.model import build_noise_scheduler, build_unet
from cdd_ray.train_loop import NonFiniteLossError, fused_losses, train


def count_forwards(monkeypatch):
    from diffusers import UNet2DModel

    calls = {"n": 0}
    original = UNet2DModel.forward

    def counted(self, *a, **k):
        calls["n"] += 1
        return original(self, *a, **k)

    monkeypatch.setattr(UNet2DModel, "forward", counted)
    return calls


@pytest.mark.parametrize("minorities", [[], [4], [4, 5, 7], [0, 1, 2, 3, 4, 5, 6, 7, 8]])
def test_exactly_one_unet_forward_per_primal_step(monkeypatch, smoke_split, minorities):
    cfg = build_config("smoke", overrides={"optim.steps": 6, "data.minority_classes": minorities},
                       unconstrained=not minorities)
    obj, y = smoke_split.objective, smoke_split.objective_labels  # constraint data for these classes
    split = dataclasses.replace(smoke_split, constraints={f"class_{c}": obj[y == c] for c in minorities},
                                constraint_classes={f"class_{c}": c for c in minorities})
    calls = count_forwards(monkeypatch)
    result = train(cfg, split)
    assert calls["n"] == 6
    assert result.step == 6
    assert result.dual.step == (3 if minorities else 0)


def test_fused_losses_equal_separate_forwards():
    cfg = build_config("smoke")
    torch.manual_seed(0)
    unet = build_unet(cfg.model, 8).eval()
    sched = build_noise_scheduler(cfg.model)
    batches = [torch.rand(5, 1, 8, 8) * 2 - 1, torch.rand(3, 1, 8, 8) * 2 - 1, torch.rand(2, 1, 8, 8) * 2 - 1]
    with torch.no_grad():
        fused = fused_losses(unet, sched, batches, torch.Generator().manual_seed(3))
        # The same noise and timesteps, one forward per dataset (the authors' approach).
        g = torch.Generator().manual_seed(3)
        x0 = torch.cat(batches)
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, 1000, (x0.shape[0],), generator=g)
        separate, start = [], 0
        for b in batches:
            sl = slice(start, start + b.shape[0])
            abar = sched.alphas_cumprod[t[sl]].view(-1, 1, 1, 1)
            xt = abar.sqrt() * b + (1 - abar).sqrt() * noise[sl]
            pred = unet(xt, t[sl]).sample
            separate.append(((pred - noise[sl]) ** 2).mean())
            start += b.shape[0]
    for f, s in zip(fused, separate):
        assert abs(f.item() - s.item()) < 1e-5


def test_training_is_deterministic_and_lambda_follows_the_losses(smoke_split):
    cfg = build_config("smoke", overrides={"optim.steps": 8})
    a, b = train(cfg, smoke_split), train(cfg, smoke_split)
    assert a.dual.lam_history == b.dual.lam_history
    assert len(a.history) == 4 and a.dual.step == 4
    # Recompute the resilient recursion from the recorded losses.
    lam = [0.0] * 3
    for lbar, recorded in zip(a.dual.lbar_history, a.dual.lam_history):
        lam = [max(0.0, l + 0.1 * (g - 0.0 - 2 * cfg.dual.gamma * l)) for l, g in zip(lam, lbar)]
        assert recorded == pytest.approx(lam, abs=1e-12)
    assert all(m["lambda_class_4"] >= 0 for m in a.history)


def test_resume_from_snapshot_continues_exactly(smoke_split):
    cfg = build_config("smoke", overrides={"optim.steps": 8})
    full = train(cfg, smoke_split)
    snaps: dict[int, Snapshot] = {}

    def keep(metrics, snapshot):
        if metrics["step"] == 4:
            snaps[4] = snapshot()
        if metrics["step"] == 6:
            raise KeyboardInterrupt  # the run dies after its checkpoint at step 4

    with pytest.raises(KeyboardInterrupt):
        train(cfg, smoke_split, on_block=keep)
    resumed = train(cfg, smoke_split, resume=snaps[4])
    assert resumed.step == 8 and resumed.dual.step == 4
    assert len(resumed.dual.lam_history) == len(full.dual.lam_history) == 4
    for r, f in zip(resumed.dual.lam_history, full.dual.lam_history):
        assert r == pytest.approx(f, abs=1e-6)
    for p, q in zip(resumed.ema_unet.parameters(), full.ema_unet.parameters()):
        assert torch.allclose(p, q, atol=1e-6)


def test_non_finite_loss_stops_before_lambda_update(smoke_split, tmp_path):
    cfg = build_config("smoke", overrides={"optim.steps": 6})
    seen = []

    def poison(step):
        if step == 3:
            with torch.no_grad():
                for p in unet_ref["unet"].parameters():
                    p.fill_(math.nan)

    unet_ref = {}
    import cdd_ray.train_loop as tl

    original = tl.unet_for

    def capture(*a, **k):
        m = original(*a, **k)
        unet_ref.setdefault("unet", m)
        return m

    tl.unet_for = capture
    try:
        with pytest.raises(NonFiniteLossError, match="non-finite loss at step 4"):
            train(cfg, smoke_split, fault=poison,
                  on_block=lambda m, s: (seen.append(m["lambda_class_4"]), checkpoint.save(tmp_path / "ckpt", s())))
    finally:
        tl.unet_for = original
    assert len(seen) == 1 and all(math.isfinite(v) for v in seen)
    last = checkpoint.load(tmp_path / "ckpt")  # the last good checkpoint: loadable, finite
    assert last.meta["step"] == 2 and last.dual.lam[0] == seen[0]
    assert all(torch.isfinite(p).all() for p in last.unet.parameters())


def test_channels_last_trains_the_same_model(smoke_split):
    a = train(build_config("smoke", overrides={"optim.steps": 4}), smoke_split)
    b = train(build_config("smoke", overrides={"optim.steps": 4, "optim.channels_last": True}), smoke_split)
    assert b.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert len(a.dual.lam_history) == 2
    for x, y in zip(a.dual.lam_history, b.dual.lam_history):
        assert x == pytest.approx(y, rel=1e-4, abs=1e-6)
