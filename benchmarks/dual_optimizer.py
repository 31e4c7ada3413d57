"""Gradient vs nuPI dual steps, side by side: lambda trajectories, how far lambda still moves, class shares.

Train the runs to compare (the same config but ``dual.optimizer``; on 2 cores both at once, one thread each,
34 minutes on the cpu preset on 2026-12-03), then compare their output folders:

    python jobs/train_mnist.py --preset cpu --local --out runs/dual-gradient --set dual.optimizer=gradient
    python jobs/train_mnist.py --preset cpu --local --out runs/dual-nupi --set dual.optimizer=nupi
    python benchmarks/dual_optimizer.py runs/dual-gradient runs/dual-nupi --plot docs/dual-optimizers.png

For each run and constraint: lambda at the end, its range (max - min) and net change over the last half of the
dual steps (a settled multiplier moves little there), its peak, the primal step from which it stays within 0.02 of
its final value, and the generated class shares with their 95% intervals.
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cdd_ray import plots  # noqa: E402  (matplotlib on Agg)

plt = plots.plt


def load(run: Path) -> tuple[dict, list[dict], dict]:
    for f in ("summary.json", "history.json", "config.json"):
        if not (run / f).is_file():
            sys.exit(f"error: {run}: no {f} (give the --out folder of a finished train_mnist.py run)")
    return tuple(json.loads((run / f).read_text()) for f in ("summary.json", "history.json", "config.json"))


def label_of(config: dict) -> str:
    d = config["dual"]
    if d["optimizer"] == "nupi":
        return f"nupi (kp {d['kp']:g}, ki {d['ki']:g}, nu {d['nu']:g}), eta {d['eta']:g}"
    return f"gradient, eta {d['eta']:g}"


SETTLED = 0.02  # lambda within this of its final value from then on


def trajectory(history: list[dict], name: str) -> dict[str, float]:
    lam = [m[f"lambda_{name}"] for m in history]
    half = lam[len(lam) // 2:]
    outside = [i for i, v in enumerate(lam) if abs(v - lam[-1]) > SETTLED]
    settled = history[outside[-1] + 1]["step"] if outside else history[0]["step"]
    return {"final": lam[-1], "range": max(half) - min(half), "net": lam[-1] - half[0], "settled": settled,
            "peak": max(lam)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path, help="output folders of finished runs")
    p.add_argument("--plot", type=Path, default=None, help="write the lambda trajectories side by side here")
    args = p.parse_args()
    loaded = [(run, *load(run)) for run in args.runs]
    names = list(loaded[0][1]["lambda"])
    print("| run | constraint | final lambda | range over the last half | net change over the last half | peak | "
          f"settled (within {SETTLED} of final) from primal step |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for run, summary, history, config in loaded:
        for n in names:
            h = trajectory(history, n)
            print(f"| {label_of(config)} | {n} | {h['final']:.4f} | {h['range']:.4f} | {h['net']:+.4f} | "
                  f"{h['peak']:.3f} | {h['settled']} |")
    print()
    print("| run | class shares (95% interval) | minority share | tv to uniform | largest predicted-share error |")
    print("| --- | --- | --- | --- | --- |")
    for run, s, history, config in loaded:
        shares = ", ".join(f"{c}: {v:.3f} [{lo:.3f}, {hi:.3f}]"
                           for c, v, (lo, hi) in zip(s["class_ids"], s["class_shares"], s["class_shares_ci"]))
        # (runs written before summary.json had prediction_error: the same gap from its two share lists)
        err = max(abs(a - b) for a, b in zip(s["class_shares"], s["predicted_shares"]))
        ms, (mlo, mhi) = s["minority_share"], s["minority_share_ci"]
        tv, (tlo, thi) = s["tv_to_uniform"], s["tv_to_uniform_ci"]
        print(f"| {label_of(config)} | {shares} | {ms:.3f} [{mlo:.3f}, {mhi:.3f}] | {tv:.3f} [{tlo:.3f}, {thi:.3f}] "
              f"| {err:.3f} |")
    if args.plot:
        fig, axes = plt.subplots(1, len(loaded), figsize=(5 * len(loaded), 3.4), sharey=True, squeeze=False)
        for ax, (run, s, history, config) in zip(axes[0], loaded):
            steps = [m["step"] for m in history]
            for n in names:
                ax.plot(steps, [m[f"lambda_{n}"] for m in history], label=n, lw=1)
            ax.axvline(steps[len(steps) // 2], color="grey", ls=":", lw=1)  # the last half starts here
            ax.set_title(label_of(config), fontsize=9)
            ax.set_xlabel("primal step")
        axes[0][0].set_ylabel("lambda")
        axes[0][0].legend(fontsize=8)
        fig.tight_layout()
        args.plot.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.plot, dpi=100)
        plt.close(fig)
        print(f"\nwrote {args.plot}")


if __name__ == "__main__":
    main()
