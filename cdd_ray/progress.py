"""Rank 0's training progress on the console: a tqdm bar on a terminal, a line a minute in a log (``LineProgress``),
or what a caller makes (a Ray worker's bar drawn on the driver: ``cdd_ray.cluster.worker.ray_progress``); updated after
every dual step with the objective loss and lambda per constraint (``bar_text``), through the loop's ``on_block``
hook (``with_bar``): the loop itself draws nothing."""

from __future__ import annotations

import sys
import time
from typing import Any, Callable

from tqdm.auto import tqdm

from cdd_ray.core.loop import BlockCallback


def bar_text(metrics: dict[str, float], names: list[str]) -> str:
    """The training bar's description: the objective loss and lambda per constraint (``class_4`` -> ``λ4``)."""
    parts = [f"loss {metrics['loss_objective']:.4f}"]
    parts += [f"λ{n.removeprefix('class_')} {metrics[f'lambda_{n}']:.3f}" for n in names]
    return "train " + " ".join(parts)


def make_bar(progress: bool | str | Callable[[int, int], Any], start: int, total: int):
    """Rank 0's progress: ``True``/``"bar"``: a tqdm bar on a terminal, else (``"lines"``, or a log file) a line
    every minute (``LineProgress``); a callable: ``progress(start, total)`` makes it
    (``cdd_ray.cluster.worker.ray_progress``); False: none."""
    if not progress:
        return None
    if callable(progress):
        return progress(start, total)
    if progress == "lines" or not sys.stderr.isatty():
        return LineProgress(start, total)
    return tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True, mininterval=0.5)


class LineProgress:
    """A progress bar for a log: a line (step of the budget, the bar's text, elapsed, ETA) every ``every_s`` and at
    the end, where a tqdm bar would write a frame per refresh on one endless line (or, in a Ray worker, a line
    per refresh)."""

    def __init__(self, start: int, total: int, every_s: float = 60.0, clock: Callable[[], float] = time.monotonic):
        self.n, self.total, self.start, self.every_s, self.clock = start, total, start, every_s, clock
        self.desc = "train"
        self.t0 = self.last = clock()

    def set_description(self, desc: str) -> None:
        self.desc = desc

    def update(self, k: int = 1) -> None:
        self.n += k
        if self.clock() - self.last >= self.every_s:
            self.print()

    def close(self) -> None:
        self.print()  # where the run ended

    def print(self) -> None:
        self.last = now = self.clock()
        rate = (self.n - self.start) / max(now - self.t0, 1e-9)
        left = f"{(self.total - self.n) / rate / 60:.1f} min" if rate > 0 else "?"
        # not print(): in a Ray Train worker print goes to a logger and the console, so it would print twice
        sys.stdout.write(f"{self.desc}: step {self.n}/{self.total} ({100 * self.n / self.total:.0f}%), "
                         f"{(now - self.t0) / 60:.1f} min, ETA {left}\n")
        sys.stdout.flush()


def with_bar(bar, names: list[str], on_block: BlockCallback | None = None) -> BlockCallback:
    """An ``on_block`` hook that moves ``bar`` (None: no bar) to the block's step with its text, then calls
    ``on_block``."""

    def hook(metrics: dict[str, float], snapshot) -> None:
        if bar is not None:
            bar.set_description(bar_text(metrics, names))
            bar.update(int(metrics["step"]) - bar.n)
        if on_block is not None:
            on_block(metrics, snapshot)

    return hook
