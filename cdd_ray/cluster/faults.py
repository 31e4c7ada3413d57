"""Test hooks that fail a run on purpose (``fault.*``, off by default), so that the tests can show what survives:
a worker that raises, exits or is SIGKILLed (as the OOM killer does) at a primal step, a worker group killed while it
launches its training function, and every rank's multipliers written after each dual step (to compare ranks bit
for bit)."""

from __future__ import annotations

import json
import os
import signal
from typing import Callable

from cdd_ray import storage


def make_fault(fault_cfg, rank: int, marker: str | None) -> Callable[[int], None] | None:
    """Test hook: worker ``fault.rank`` fails at ``fault.fail_at_step``, once per run (a marker file in the run's
    storage, local or a URI)."""
    if fault_cfg.fail_at_step < 0 or rank != fault_cfg.rank or not marker:
        return None

    def fault(step: int) -> None:
        if step != fault_cfg.fail_at_step or storage.exists(marker):
            return
        storage.write_text(marker, f"failed at step {step}\n")
        if fault_cfg.mode == "exit":
            os._exit(1)
        if fault_cfg.mode == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        raise RuntimeError(f"injected fault at step {step} on rank {rank}")

    return fault

FAULT_ON_LOAD_ENV = "CDD_RAY_FAULT_ON_LOAD"  # set in the workers' runtime env of a fit with fault.kill_on_load


class KillOnLoad:
    """Test hook (``fault.kill_on_load``): a value in the training function's config. A Ray Train worker
    unpickles it while it loads its training function (the worker group's launch), and is SIGKILLed there, once per
    run (the marker file); elsewhere (no ``FAULT_ON_LOAD_ENV``) it unpickles to None."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return _kill_on_load, (self.marker,)


def _kill_on_load(marker: str) -> None:
    if os.environ.get(FAULT_ON_LOAD_ENV) == "1" and not storage.exists(marker):
        storage.write_text(marker, "killed while loading its training function\n")
        os.kill(os.getpid(), signal.SIGKILL)


def dual_dumper(directory: str, rank: int, names: list[str]) -> Callable[[dict[str, float]], None]:
    """Append lambda (exact hex floats) after every dual step to ``directory/rank{rank}.jsonl``."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, f"rank{rank}.jsonl")

    def dump(metrics: dict[str, float]) -> None:
        lam = [float.hex(float(metrics[f"lambda_{n}"])) for n in names]
        with open(path, "a") as f:
            f.write(json.dumps({"dual_step": int(metrics["dual_step"]), "lam": lam}) + "\n")

    return dump
