"""How nuPI's defaults were picked: gradient vs nuPI on a simulated constraint loss (no training, seconds).

The constraint loss reacts to lambda with a lag (the model adapts slowly) and carries batch noise:
    L_inf(lambda) = 0.06 / (1 + 5 lambda),  L_t = L_inf + (L_{t-1} - L_inf) x 0.98,  Lbar_t = L_t + N(0, 0.005)
375 dual steps at eta 0.1 (a cpu run's 750, halved), plain (b 0.035) and resilient (gamma 0.15, b 0).
Per setting: lambda at the end, its range over the last half (lower: settled), lambda at the half.

    python benchmarks/dual_toy.py
"""

import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cdd_ray.core.dual import DualState  # noqa: E402


def simulate(optimizer: str, kind: str, b: float, kp: float = 0.0, nu: float = 0.0, steps: int = 375,
             seed: int = 0) -> tuple[float, float, float]:
    rng = random.Random(seed)
    s = DualState.create(["a"], [b], kind, 0.1, 0.15, optimizer=optimizer, kp=kp, nu=nu)
    loss, lam = 0.08, []
    for _ in range(steps):
        target = 0.06 / (1 + 5 * s.lam[0])
        loss = target + (loss - target) * 0.98
        s.update([loss + rng.gauss(0, 0.005)])
        lam.append(s.lam[0])
    half = lam[steps // 2:]
    return lam[-1], max(half) - min(half), lam[steps // 2]


def main() -> None:
    print("| kind | dual step | final lambda | range over the last half | lambda at the half |")
    print("| --- | --- | --- | --- | --- |")
    for kind, b in (("plain", 0.035), ("resilient", 0.0)):
        settings = [("gradient", 0.0, 0.0)] + [("nupi", kp, nu) for kp in (1, 5, 10, 30) for nu in (0.0, 0.5, 0.9)]
        for opt, kp, nu in settings:
            final, spread, mid = simulate(opt, kind, b, kp, nu)
            name = "gradient" if opt == "gradient" else f"nupi kp {kp:g} nu {nu:g}"
            print(f"| {kind} | {name} | {final:.3f} | {spread:.3f} | {mid:.3f} |")


if __name__ == "__main__":
    main()
