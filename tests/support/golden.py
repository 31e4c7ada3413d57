"""Saved outputs of fixed-seed smoke commands (tests/golden/*.json): what the code gave before a redesign, which
the same commands must give after it (issue #28: behaviour unchanged).

On the machine kind that saved them (same torch, CPU instruction set and core count) every kept number must be
equal, bit for bit, but the FIDs (within ``FID_REL``: below): a fixed-seed smoke run is deterministic there (measured: two local runs and a Ray run give
the same bytes in history.json and the same summary but for the timing keys). On another kind, float32 kernels
round differently (AVX-512 against AVX2), so only the training trajectory is compared, within a relative 1e-3:
six steps of float32 arithmetic move a loss or a multiplier by about 1e-6 relative, while any change of the
algorithm (a step, a batch, a seed, a loss weight) moves them by more than 1e-2. Evaluation numbers are not
compared there: they go through the classifier's argmax labels of 32 samples, where one label that flips moves a
share by 1/32 and the FIDs by tens.

``CDD_RAY_SAVE_GOLDEN=1 pytest -n 0`` on the tests that call ``check`` (CONTRIBUTING.md lists them) writes them
again: only for a change meant to alter the numbers (say so in its commit)."""

import json
import os
import re
from pathlib import Path

import torch

GOLDEN = Path(__file__).parents[1] / "golden"
# Differ from run to run by design: names, times, paths and ids.
VOLATILE = {"name", "wall_s", "train_s", "eval_s", "ray_checkpoint", "mlflow_run_id", "run_id", "trial_id"}
# What the training itself decides, compared on every machine (the rest of a summary is evaluation).
TRAINING = {"lambda", "steps", "train_images", "lr", "batch_size", "constraint_batch_size", "dual_steps",
            "workers", "unet_params", "resumed_from_step", "class_ids", "minority_classes", "constrained", "preset",
            "data_source", "dual_kind", "role", "status", "dual.b_rel", "dual.eta", "dual.gamma", "dual.kind"}
REL = 1e-3
# FIDs on the same machine kind: they go through the labeller's float features and a matrix square root, and moved
# by up to 1.3e-3 relative between two installs of the same package versions (2026-12-08: a fresh environment, the
# code of 0c2fe98 and of today alike), while every share, precision, loss and multiplier stayed bit for bit; a change
# of the samples moves those too.
FID_REL = 1e-2
FID_KEY = re.compile(r"\.fid[a-z_]*(\.\w+|\[\d+\])?$")


def machine() -> dict:
    return {"torch": torch.__version__, "cpu": torch.backends.cpu.get_cpu_capability(), "cores": os.cpu_count()}


def stable(value):
    """``value`` without its VOLATILE keys, at any depth."""
    if isinstance(value, dict):
        return {k: stable(v) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [stable(v) for v in value]
    return value


def differences(got, want, rel: float | None, where: str = "") -> list[str]:
    """Where ``got`` differs from ``want``: exactly (``rel`` None) or numbers within ``rel`` relative."""
    if isinstance(want, dict) and isinstance(got, dict):
        if set(got) != set(want):
            return [f"{where or '.'}: keys {sorted(set(got) ^ set(want))} only on one side"]
        return [d for k in want for d in differences(got[k], want[k], rel, f"{where}.{k}")]
    if isinstance(want, list) and isinstance(got, list):
        if len(got) != len(want):
            return [f"{where}: {len(got)} items, saved {len(want)}"]
        return [d for i, (g, w) in enumerate(zip(got, want)) for d in differences(g, w, rel, f"{where}[{i}]")]
    numbers = (int, float)
    if rel is None and FID_KEY.search(where):  # exact elsewhere; a CSV row holds its numbers as text
        try:
            g, w = float(got), float(want)
            return [] if abs(g - w) <= FID_REL * max(abs(w), 1e-12) else [f"{where}: {got!r}, saved {want!r}"]
        except (TypeError, ValueError):
            pass
    if rel is not None and isinstance(got, numbers) and isinstance(want, numbers) and not isinstance(got, bool):
        return [] if abs(got - want) <= rel * max(abs(want), 1e-12) else [f"{where}: {got!r}, saved {want!r}"]
    return [] if got == want and type(got) is type(want) else [f"{where}: {got!r}, saved {want!r}"]


def training_part(part: str, value):
    """What the training decides in one part of a command's outputs: all of its history (losses, multipliers,
    slacks per dual step), the TRAINING keys of a summary or of each row of a front."""
    if part == "history":
        return value
    if isinstance(value, list):
        return [training_part(part, v) for v in value]
    return {k: v for k, v in value.items() if k in TRAINING}


def check(name: str, outputs: dict) -> None:
    """Compare a command's ``outputs`` ({part: JSON-able}, e.g. its summary and history) with
    tests/golden/NAME.json, or save them there under CDD_RAY_SAVE_GOLDEN."""
    path = GOLDEN / f"{name}.json"
    got = json.loads(json.dumps(stable(outputs)))  # what JSON keeps: tuples as lists, floats round-trip exactly
    if os.environ.get("CDD_RAY_SAVE_GOLDEN"):
        GOLDEN.mkdir(exist_ok=True)
        path.write_text(json.dumps({"machine": machine(), "outputs": got}, indent=1) + "\n")
        return
    saved = json.loads(path.read_text())
    if saved["machine"] == machine():
        found = differences(got, saved["outputs"], None)
    else:
        found = differences({k: training_part(k, v) for k, v in got.items()},
                            {k: training_part(k, v) for k, v in saved["outputs"].items()}, REL)
    assert not found, f"{name}: not what the saved run gave ({path}; machine {saved['machine']}):\n" + "\n".join(
        found[:20])
