"""The sweep's console table: one line per trial (number, Tune's id, status, dual kind, the searched parameters,
primal step of its budget, loss, largest lambda, both objectives once evaluated) with trials finished / running /
pending and the sweep's ETA; redrawn in place on a terminal, printed when a trial starts or ends and every two
minutes in a log. A Ray Tune callback, so it lives with the sweep, not in ``cdd_ray.console``."""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, TextIO

from ray.tune import Callback


@dataclass
class TrialLine:
    number: int
    trial_id: str = ""  # Tune's (the front and the trials' MLflow runs name trials by it)
    status: str = "running"  # running, done, stopped (by ASHA), error
    params: dict[str, Any] = field(default_factory=dict)
    budget: int = 0  # the trial's primal steps
    step: int = 0
    loss_mean: float | None = None
    max_lambda: float | None = None
    objectives: dict[str, float] = field(default_factory=dict)
    started: float = 0.0
    ended: float | None = None


def trial_number(trial, trials: list) -> int | None:
    """A trial's number: its place in Tune's list of the sweep's trials (the order they were created in, kept by
    a restored sweep), 1-based; the console's table, the trials' MLflow run names and the front use it."""
    ids = [t.trial_id for t in trials]
    return ids.index(trial.trial_id) + 1 if trial.trial_id in ids else None


def short_name(key: str) -> str:
    """``dual.gamma`` -> ``gamma``: the table's column for a searched key."""
    return key.rsplit(".", 1)[-1]


def fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if v != v:
            return "nan"
        if v == 0 or 1e-3 <= abs(v) < 1e4:
            return f"{v:.3g}" if abs(v) < 1 else f"{v:.4g}"
        return f"{v:.1e}"
    return str(v)


class SweepTable(Callback):
    """A Ray Tune callback on the driver: the sweep's trials as a compact table with the sweep's ETA.

    ``param_keys``: the searched config keys (``dual.kind`` becomes the dual column); ``budget``: a trial's primal
    steps when ``optim.steps`` is not searched; ``num_samples``: trials the sweep will run; ``concurrency``: at
    once. On a terminal the table is redrawn in place every ``tty_every_s``; in a log it is printed when a trial
    starts or ends (at most every ``change_every_s``) and otherwise every ``log_every_s``.
    """

    def __init__(self, param_keys: list[str], budget: int, num_samples: int, concurrency: int,
                 objectives: tuple[str, str], out: TextIO | None = None, tty: bool | None = None,
                 clock: Callable[[], float] = time.time, tty_every_s: float = 2.0, log_every_s: float = 120.0,
                 change_every_s: float = 5.0):
        self.param_keys = [k for k in param_keys if k != "dual.kind"]
        self.budget, self.num_samples, self.concurrency = budget, num_samples, max(1, concurrency)
        self.objectives = objectives
        self.out = out
        self.tty = tty
        self.clock = clock
        self.tty_every_s, self.log_every_s, self.change_every_s = tty_every_s, log_every_s, change_every_s
        self.lines: dict[str, TrialLine] = {}
        self.started = clock()
        self.last_print = -math.inf
        self.changed = False
        self.drawn = 0  # lines of the table last drawn in place

    # ------------------------------------------------------------ what Tune tells

    def _line(self, trial, trials: list) -> TrialLine:
        line = self.lines.get(trial.trial_id)
        if line is None:
            cfg = trial.config or {}
            budget = int(cfg.get("optim.steps") or self.budget)
            number = trial_number(trial, trials) or len(self.lines) + 1
            line = TrialLine(number=number, trial_id=trial.trial_id, budget=budget, started=self.clock(),
                             params={k: cfg.get(k) for k in ("dual.kind", *self.param_keys)})
            self.lines[trial.trial_id] = line
            self.changed = True
        return line

    def setup(self, stop=None, num_samples=None, total_num_samples=None, **info):
        """A new (or restored) Tuner's fit: the clock starts now."""
        self.started, self.last_print, self.drawn = self.clock(), -math.inf, 0
        self.lines.clear()

    def on_trial_start(self, iteration, trials, trial, **info):
        self._line(trial, trials)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self.update(self._line(trial, trials), result)

    def on_trial_complete(self, iteration, trials, trial, **info):
        line = self._line(trial, trials)
        self.update(line, trial.last_result or {})
        line.status = self._ended_status(line)
        line.ended = self.clock()
        self.changed = True

    def on_trial_error(self, iteration, trials, trial, **info):
        line = self._line(trial, trials)
        line.status, line.ended = "error", self.clock()
        self.changed = True

    def on_step_end(self, iteration, trials, **info):
        for trial in trials:  # a restored sweep's trials that had ended before the interruption
            if trial.trial_id not in self.lines and trial.status in ("TERMINATED", "ERROR"):
                line = self._line(trial, trials)
                self.update(line, trial.last_result or {})
                line.ended = line.started
                line.status = "error" if trial.status == "ERROR" else self._ended_status(line)
        self.maybe_print()

    def on_experiment_end(self, trials, **info):
        if self.changed or self._is_tty():  # a log already has the last table
            self.print(final=True)

    def _ended_status(self, line: TrialLine) -> str:
        return "done" if all(o in line.objectives for o in self.objectives) else "stopped"

    def update(self, line: TrialLine, result: dict[str, Any]) -> None:
        if isinstance(result.get("step"), (int, float)):
            line.step = int(result["step"])
        if isinstance(result.get("loss_mean"), (int, float)):
            line.loss_mean = float(result["loss_mean"])
        lams = [v for k, v in result.items() if k.startswith("lambda_") and isinstance(v, (int, float))]
        if lams:
            line.max_lambda = max(lams)
        for o in self.objectives:
            if isinstance(result.get(o), (int, float)):
                line.objectives[o] = float(result[o])

    # ------------------------------------------------------------ what it prints

    def counts(self) -> tuple[int, int, int]:
        """Trials (finished: done, stopped or error; running; pending: not started yet)."""
        finished = sum(line.status != "running" for line in self.lines.values())
        running = len(self.lines) - finished
        return finished, running, max(0, self.num_samples - len(self.lines))

    def eta_s(self) -> float | None:
        """Seconds until the sweep should end: the trials' mean wall time per step (finished and running trials,
        start-up included) times the steps left, spread over the trials that run at once. None: nothing
        measured yet."""
        now = self.clock()
        spent = sum((line.ended or now) - line.started for line in self.lines.values())
        steps = sum(line.step for line in self.lines.values())
        if steps == 0:
            return None
        per_step = spent / steps
        left = sum(line.budget - line.step for line in self.lines.values() if line.status == "running")
        left += self.counts()[2] * self.budget
        return per_step * left / self.concurrency

    def render(self) -> list[str]:
        q, f = self.objectives
        head = ["trial", "id", "status", "dual", *map(short_name, self.param_keys), "step", "loss_mean", "max λ", q, f]
        rows = [head]
        for line in sorted(self.lines.values(), key=lambda x: x.number):
            rows.append([f"t{line.number:02d}", line.trial_id, line.status, fmt(line.params.get("dual.kind")),
                         *(fmt(line.params.get(k)) for k in self.param_keys), f"{line.step}/{line.budget}",
                         fmt(line.loss_mean), fmt(line.max_lambda),
                         fmt(line.objectives.get(q)), fmt(line.objectives.get(f))])
        widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
        text = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        done, running, pending = self.counts()
        eta = self.eta_s()
        when = ("ETA: measuring" if eta is None else
                f"ETA {time.strftime('%H:%M', time.localtime(self.clock() + eta))} (in {eta / 60:.0f} min)")
        elapsed = (self.clock() - self.started) / 60
        text.append(f"trials: {done} finished, {running} running, {pending} pending; {elapsed:.0f} min so far; "
                    f"{when}")
        return text

    def _out(self) -> TextIO:
        return self.out or sys.stdout

    def _is_tty(self) -> bool:
        if self.tty is not None:
            return self.tty
        return bool(getattr(self._out(), "isatty", lambda: False)())

    def maybe_print(self) -> None:
        wait = self.clock() - self.last_print
        if self._is_tty():
            due = wait >= self.tty_every_s
        else:
            due = wait >= self.log_every_s or (self.changed and wait >= self.change_every_s)
        if due and self.lines:
            self.print()

    def print(self, final: bool = False) -> None:
        text = self.render()
        out = self._out()
        if self._is_tty() and self.drawn:
            out.write(f"\x1b[{self.drawn}F\x1b[J")  # back to the table's first line, clear to the end
        out.write("\n".join(text) + "\n")
        out.flush()
        self.drawn = 0 if final else len(text)
        self.last_print = self.clock()
        self.changed = False
