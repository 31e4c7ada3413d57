"""Dual variables: the projected dual step and the serialisable dual state (paper.md section 2).

Pure Python and tiny on purpose: no torch, no Ray. Every rank calls ``dual_step`` with the same
(all-reduced) inputs and therefore computes bitwise identical multipliers.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Sequence

KINDS = ("plain", "resilient")


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
    if kind not in KINDS:
        raise ValueError(f"dual kind {kind!r} not allowed; allowed: {', '.join(KINDS)}")
    if not (len(lam) == len(lbar) == len(b)):
        raise ValueError(f"lambda ({len(lam)}), Lbar ({len(lbar)}) and b ({len(b)}) differ in length")
    bad = [i for i, v in enumerate(lbar) if not math.isfinite(v)]
    if bad:
        raise FloatingPointError(f"constraint loss is not finite for constraints {bad}: {list(lbar)}")
    relax = 2.0 * gamma if kind == "resilient" else 0.0
    return [max(0.0, l + eta * (g - bi - relax * l)) for l, g, bi in zip(lam, lbar, b)]


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
    step: int = 0  # dual steps taken
    lam_history: list[list[float]] = field(default_factory=list)  # lambda after each dual step
    lbar_history: list[list[float]] = field(default_factory=list)  # Lbar used by each dual step

    @classmethod
    def create(cls, names: Sequence[str], b: Sequence[float], kind: str, eta: float, gamma: float,
               lambda_init: float = 0.0) -> "DualState":
        return cls(names=list(names), lam=[float(lambda_init)] * len(names), b=[float(x) for x in b],
                   kind=kind, eta=float(eta), gamma=float(gamma))

    def update(self, lbar: Sequence[float]) -> list[float]:
        """Take one dual step from the mean constraint losses since the last one."""
        self.lam = dual_step(self.lam, lbar, self.b, self.eta, self.kind, self.gamma)
        self.step += 1
        self.lam_history.append(list(self.lam))
        self.lbar_history.append([float(v) for v in lbar])
        return self.lam

    def by_name(self) -> dict[str, float]:
        return dict(zip(self.names, self.lam))

    def to_dict(self) -> dict:
        """A deep copy as plain JSON types."""
        return copy.deepcopy({
            "names": self.names, "lam": self.lam, "b": self.b, "kind": self.kind, "eta": self.eta,
            "gamma": self.gamma, "step": self.step, "lam_history": self.lam_history,
            "lbar_history": self.lbar_history,
        })

    @classmethod
    def from_dict(cls, d: dict) -> "DualState":
        return cls(**{k: copy.deepcopy(d[k]) for k in ("names", "lam", "b", "kind", "eta", "gamma", "step",
                                         "lam_history", "lbar_history")})
