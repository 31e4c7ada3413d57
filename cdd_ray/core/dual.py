"""Dual variables: the projected dual steps and the serialisable dual state (paper.md section 2).

Pure Python and tiny on purpose: no torch, no Ray. Every rank calls the step with the same
(all-reduced) inputs and therefore computes bitwise identical multipliers.

Two dual optimisers, both projected onto lambda >= 0 and both driven by the same error signal
e = d(dual function)/d(lambda) (``dual_error``: Lbar - b, minus 2 gamma lambda when resilient):

- ``gradient``: the paper's projected ascent, lambda <- max(0, lambda + eta e).
- ``nupi``: the nuPI controller of Sohrabi et al., "On PI controllers for updating Lagrange multipliers in
  constrained optimization" (ICML 2024), eq. for nuPI(eta, kp, ki, nu):
      xi_t = nu xi_{t-1} + (1 - nu) e_t
      lambda_{t+1} = max(0, lambda_t + eta (ki e_t + kp (xi_t - xi_{t-1})))
  with xi_{-1} = e_0 (their "SGD" initialisation: the first step is the gradient step with eta ki).
  kp = 0 and ki = 1 is the gradient step; kp > 0 adds a damped response to the change in the error,
  so lambda can move fast without overshooting.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field, fields
from typing import Sequence

KINDS = ("plain", "resilient")
OPTIMIZERS = ("gradient", "nupi")


def dual_error(lam: Sequence[float], lbar: Sequence[float], b: Sequence[float], kind: str = "plain",
               gamma: float = 0.0) -> list[float]:
    """The dual function's gradient in lambda: Lbar_i - b_i (plain), Lbar_i - b_i - 2 gamma lambda_i (resilient)."""
    if kind not in KINDS:
        raise ValueError(f"dual kind {kind!r} not allowed; allowed: {', '.join(KINDS)}")
    if not (len(lam) == len(lbar) == len(b)):
        raise ValueError(f"lambda ({len(lam)}), Lbar ({len(lbar)}) and b ({len(b)}) differ in length")
    bad = [i for i, v in enumerate(lbar) if not math.isfinite(v)]
    if bad:
        raise FloatingPointError(f"constraint loss is not finite for constraints {bad}: {list(lbar)}")
    relax = 2.0 * gamma if kind == "resilient" else 0.0
    return [g - bi - relax * l for l, g, bi in zip(lam, lbar, b)]


def dual_step(
    lam: Sequence[float],
    lbar: Sequence[float],
    b: Sequence[float],
    eta: float,
    kind: str = "plain",
    gamma: float = 0.0,
) -> list[float]:
    """One projected ascent step on the multipliers.

    plain:      lambda_i <- max(0, lambda_i + eta (Lbar_i - b_i))
    resilient:  lambda_i <- max(0, lambda_i + eta (Lbar_i - b_i - 2 gamma lambda_i))
    """
    return [max(0.0, l + eta * e) for l, e in zip(lam, dual_error(lam, lbar, b, kind, gamma))]


def nupi_step(lam: Sequence[float], error: Sequence[float], xi: Sequence[float] | None, eta: float, kp: float,
              ki: float, nu: float) -> tuple[list[float], list[float]]:
    """One projected nuPI step: (lambda_{t+1}, xi_t) from lambda_t, e_t and xi_{t-1} (None before the first step:
    xi_{-1} = e_0). See the module docstring for the recursion."""
    if not (len(lam) == len(error)) or (xi is not None and len(xi) != len(lam)):
        raise ValueError(f"lambda ({len(lam)}), error ({len(error)}) and xi ({len(xi or [])}) differ in length")
    prev = list(error) if xi is None else list(xi)
    new_xi = [nu * p + (1.0 - nu) * e for p, e in zip(prev, error)]
    lam_out = [max(0.0, l + eta * (ki * e + kp * (x - p))) for l, e, x, p in zip(lam, error, new_xi, prev)]
    return lam_out, new_xi


def resilient_fixed_point(lbar: float, b: float, gamma: float) -> float:
    """lambda* of the resilient step for a constant loss: max(0, (Lbar - b) / (2 gamma))."""
    return max(0.0, (lbar - b) / (2.0 * gamma))


def predicted_shares(priors: Sequence[float], lam_by_class: dict[int, float]) -> list[float]:
    """Class shares of the optimal constrained model p* = (q + sum_i lambda_i q_i) / (1 + sum lambda).

    ``priors[c]`` is class c's share in the objective data; ``lam_by_class`` maps a constrained class
    to its multiplier (q_i = q restricted to class i).
    """
    total = 1.0 + sum(lam_by_class.values())
    return [(p + lam_by_class.get(c, 0.0)) / total for c, p in enumerate(priors)]


@dataclass
class DualState:
    """Multipliers, thresholds and their history; ``to_dict``/``from_dict`` round-trip through JSON."""

    names: list[str]
    lam: list[float]
    b: list[float]
    kind: str = "plain"
    eta: float = 0.1
    gamma: float = 0.0
    optimizer: str = "gradient"
    kp: float = 0.0  # nupi: proportional gain
    ki: float = 1.0  # nupi: integral gain
    nu: float = 0.0  # nupi: EMA factor of the error
    xi: list[float] | None = None  # nupi: the smoothed error after the last step (None before the first)
    step: int = 0  # dual steps taken
    lam_history: list[list[float]] = field(default_factory=list)  # lambda after each dual step
    lbar_history: list[list[float]] = field(default_factory=list)  # Lbar used by each dual step

    @classmethod
    def create(cls, names: Sequence[str], b: Sequence[float], kind: str, eta: float, gamma: float,
               lambda_init: float = 0.0, optimizer: str = "gradient", kp: float = 0.0, ki: float = 1.0,
               nu: float = 0.0) -> "DualState":
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"dual optimizer {optimizer!r} not allowed; allowed: {', '.join(OPTIMIZERS)}")
        return cls(names=list(names), lam=[float(lambda_init)] * len(names), b=[float(x) for x in b],
                   kind=kind, eta=float(eta), gamma=float(gamma), optimizer=optimizer, kp=float(kp),
                   ki=float(ki), nu=float(nu))

    def update(self, lbar: Sequence[float], eta: float | None = None) -> list[float]:
        """Take one dual step from the mean constraint losses since the last one, with step size ``eta``
        (default: the state's own; ``dual.eta_schedule=follow_lr`` passes the scheduled one)."""
        eta = self.eta if eta is None else eta
        if self.optimizer == "gradient":
            self.lam = dual_step(self.lam, lbar, self.b, eta, self.kind, self.gamma)
        else:
            error = dual_error(self.lam, lbar, self.b, self.kind, self.gamma)
            self.lam, self.xi = nupi_step(self.lam, error, self.xi, eta, self.kp, self.ki, self.nu)
        self.step += 1
        self.lam_history.append(list(self.lam))
        self.lbar_history.append([float(v) for v in lbar])
        return self.lam

    def by_name(self) -> dict[str, float]:
        return dict(zip(self.names, self.lam))

    def to_dict(self) -> dict:
        """A deep copy as plain JSON types."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "DualState":
        """The inverse of ``to_dict``; a state written before nuPI existed (no optimizer key) is a gradient one."""
        missing = [k for k in _WRITTEN_BEFORE_NUPI if k not in d]
        if missing:
            raise KeyError(f"dual state lacks {', '.join(missing)}")
        return cls(**{k: copy.deepcopy(v) for k, v in d.items() if k in _FIELDS})


_FIELDS = {f.name for f in fields(DualState)}
_WRITTEN_BEFORE_NUPI = ("names", "lam", "b", "kind", "eta", "gamma", "step", "lam_history", "lbar_history")
