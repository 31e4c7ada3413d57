import os

import pytest
import torch

from cdd_ray import checkpoint
from cdd_ray.checkpoint import CheckpointError
from cdd_ray.config import build_config
from cdd_ray.core.loop import Hooks, train


@pytest.fixture(scope="module")
def snap(smoke_split):
    cfg = build_config("smoke", overrides={"optim.steps": 4})
    out = {}
    train(cfg, smoke_split, hooks=Hooks(on_block=lambda m, s: out.update(snap=s())))
    return out["snap"]


def test_round_trip(tmp_path, snap):
    d = checkpoint.save(tmp_path / "ckpt", snap)
    back = checkpoint.load(d)
    assert back.meta == snap.meta and back.dual == snap.dual and back.config == snap.config
    for a, b in zip(back.unet.parameters(), snap.unet.parameters()):
        assert torch.equal(a, b)
    assert torch.equal(back.trainer_state["rng"]["noise"][0], snap.trainer_state["rng"]["noise"][0])
    unet, dual, cfg = checkpoint.load_model(d)
    assert dual.lam == snap.dual.lam and cfg["model"]["preset"] == "smoke"
    assert (d / "unet" / "diffusion_pytorch_model.safetensors").exists()


def test_interrupted_write_keeps_previous_checkpoint(tmp_path, snap, monkeypatch):
    d = checkpoint.save(tmp_path / "ckpt", snap)
    before = (d / "dual_state.json").read_text()

    def crash(*a, **k):
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(tmp_path / "ckpt", snap)
    monkeypatch.undo()
    assert (d / "dual_state.json").read_text() == before
    checkpoint.load(d)  # still complete and loadable
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temporary left behind


@pytest.mark.parametrize("damage", ["missing", "truncated", "garbage_json"])
def test_corrupt_checkpoint_is_named(tmp_path, snap, damage):
    d = checkpoint.save(tmp_path / "ckpt", snap)
    if damage == "missing":
        os.remove(d / "trainer_state.pt")
        match = "incomplete: missing trainer_state.pt"
    elif damage == "truncated":
        f = d / "unet" / "diffusion_pytorch_model.safetensors"
        f.write_bytes(f.read_bytes()[:100])
        match = "is corrupt"
    else:
        (d / "dual_state.json").write_text("{not json")
        match = "dual_state.json' is unreadable"
    with pytest.raises(CheckpointError, match=match):
        checkpoint.load(d)


class Exploit:
    def __reduce__(self):
        return (os.mkdir, (os.environ["CDD_EXPLOIT_DIR"],))


def test_trainer_state_loads_without_unpickling_code(tmp_path, snap, monkeypatch):
    d = checkpoint.save(tmp_path / "ckpt", snap)
    torch.load(d / "trainer_state.pt", weights_only=True)  # raises if it needed arbitrary objects
    monkeypatch.setenv("CDD_EXPLOIT_DIR", str(tmp_path / "pwned"))
    torch.save({"step": 1, "payload": Exploit()}, d / "trainer_state.pt")  # a tampered checkpoint
    with pytest.raises(CheckpointError, match="is corrupt"):
        checkpoint.load(d)
    assert not (tmp_path / "pwned").exists()  # the pickled call never ran


def test_newest_complete_checkpoint_wins_and_broken_ones_are_skipped(tmp_path, snap):
    import copy
    import dataclasses

    dirs = []
    for step in (2, 4, 6):
        s = dataclasses.replace(snap, meta={**copy.deepcopy(snap.meta), "step": step})
        dirs.append(checkpoint.save(tmp_path / f"checkpoint_{step}", s))
    (tmp_path / "checkpoint_junk").mkdir()  # no meta.json: ignored
    path, got = checkpoint.newest(tmp_path.glob("checkpoint_*"))
    assert path == dirs[2] and got.meta["step"] == 6
    f = dirs[2] / "unet" / "diffusion_pytorch_model.safetensors"
    f.write_bytes(f.read_bytes()[:100])  # a copy cut off by a crash
    path, got = checkpoint.newest(tmp_path.glob("checkpoint_*"))
    assert path == dirs[1] and got.meta["step"] == 4
    assert checkpoint.newest(tmp_path.glob("checkpoint_*"), after_step=4) is None
