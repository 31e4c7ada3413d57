"""The trade-off map of a sweep: what it is asked for (objectives, fairness targets, over-fitting measure: checked
before any work, ``check_request``), Pareto front, 95% intervals, reference points, fairness targets.

A row is one evaluated model: a trial (``role`` "trial") or a reference run (``role`` "baseline",
"baseline-continued", "baseline-rebalanced"), with its metrics, their intervals (``<metric>_ci``:
[lo, hi]) and, for trials, ``params``. Objectives in ``cdd_ray.metrics.MAXIMISED`` are maximised, all others
minimised.
A point is compared with a reference by the 95% interval of their *difference* (``differences``: {reference role:
{metric: [d, lo, hi]}}, from ``cdd_ray.compare``), not by whether their own intervals overlap: two intervals can
overlap while the difference, measured on the same noise, is clear. A difference is shown when its interval
excludes 0 (``verdict``).
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

from cdd_ray.config import ConfigError
from cdd_ray.evaluation.fairness import FLOORS, samples_needed
from cdd_ray.metrics import FAIRNESS_METRICS, OBJECTIVE_METRICS, OVERFITTING_METRICS, sign

NOT_DISTINGUISHABLE = "not distinguishable"
MAX_CONFIRM_SEEDS = 16  # further training seeds a sweep may confirm with; each costs a run per confirmed point


def check_request(objectives: tuple[str, str], limits: dict[str, float], overfitting: str, n_samples: int,
                  n_classes: int, confirm_seeds: int = 0) -> None:
    """What a sweep's front is asked for, refused before any work (a job checks it before it imports the sweep's
    code): two different objectives, fairness targets its evaluation can show met, a known over-fitting measure,
    a count of further training seeds (--confirm-seeds) from 0 to MAX_CONFIRM_SEEDS."""
    bad = [o for o in objectives if o not in OBJECTIVE_METRICS]
    if bad or len(objectives) != 2 or objectives[0] == objectives[1]:
        raise ConfigError(f"objectives: {list(objectives)} must be two different metrics from: "
                          f"{', '.join(OBJECTIVE_METRICS)}")
    check_limits(limits, n_samples, n_classes)
    if overfitting not in OVERFITTING_METRICS:
        raise ConfigError(f"--overfitting: {overfitting!r} not allowed; allowed: {', '.join(OVERFITTING_METRICS)}")
    if not isinstance(confirm_seeds, int) or not 0 <= confirm_seeds <= MAX_CONFIRM_SEEDS:
        raise ConfigError(f"--confirm-seeds: {confirm_seeds!r} not allowed; allowed: an integer from 0 (none) to "
                          f"{MAX_CONFIRM_SEEDS}")


def check_limits(limits: dict[str, float], n_samples: int, n_classes: int) -> None:
    """Fairness targets a sweep can show met: in (0, 1), and above what an exactly uniform generator scores with
    the evaluation's ``n_samples`` over ``n_classes`` (its floor), else refused with the samples it would need."""
    for m, x in limits.items():
        if m not in FAIRNESS_METRICS:
            raise ConfigError(f"fairness target {m!r} not allowed; allowed: {', '.join(FAIRNESS_METRICS)}")
        flag = f"--max-{'tv' if m == 'tv_to_uniform' else 'fd'}"
        if not 0 < x < 1:  # both are below 1 for any class shares (fd <= sqrt(1 - 1/k))
            raise ConfigError(f"{flag}: {x:g} must be in (0, 1)")
        floor = FLOORS[m](n_samples, n_classes)
        if x <= floor:
            raise ConfigError(
                f"{flag}: {x:g} is below what {n_samples} samples can show: an exactly uniform generator scores "
                f"{m} {floor:.3f} at eval.n_samples={n_samples} ({n_classes} classes); a target of {x:g} needs "
                f"eval.n_samples >= {samples_needed(m, x, n_classes)}, or a target above {floor:.3f}")



AXIS_LABELS = {
    "precision": "precision ({features} features; higher is better)",
    "precision_class_mean": "precision, mean over classes ({features} features; higher is better)",
    "recall": "recall ({features} features; higher is better)",
    "fid_class_mean": "per-class FID, mean ({features} features; lower is better)",
    "fid_data": "FID vs training class mix ({features} features; lower is better)",
    "fid": "FID vs balanced reference ({features} features; lower is better)",
    "tv_to_uniform": "TV to uniform classes (lower is fairer)",
    "fd": "fairness discrepancy, L2 to uniform (lower is fairer)",
    "heldout_loss_new": "held-out loss on new classes (lower: learnt)",
    "forgetting": "forgetting of old classes (lower: kept)",
    "copy_rate": "copy rate: samples nearer a training image than 99% of unseen real ones (pixels; lower is better)",
    "copy_rate_features": "copy rate in the {features} features (lower is better)",
    "generalization_gap": "generalization gap: held-out minus training denoising loss (lower is better)",
}
REFERENCE_LABELS = {"baseline": "unconstrained", "baseline-continued": "unconstrained",
                    "baseline-rebalanced": "rebalanced data"}


def _ok(r: dict[str, Any], objectives: tuple[str, ...]) -> bool:
    return not r.get("refused") and all(isinstance(r.get(o), (int, float)) and math.isfinite(r[o]) for o in objectives)


# What makes two points comparable at all: the same images and the same features under the FID.
EVALUATED_ON = ("data_source", "fid_features")


def refuse_incomparable(rows: list[dict[str, Any]], references: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows evaluated on other data or features than the first reference are refused: marked (``refused``,
    ``status``) and kept off the front and the best configs. Returns the refused rows."""
    ref = references[0] if references else {}
    refused = []
    for r in [*references[1:], *rows]:
        diff = [f"{k} {r[k]!r}, not {ref[k]!r}" for k in EVALUATED_ON if r.get(k) and ref.get(k) and r[k] != ref[k]]
        if diff:
            r["refused"] = "; ".join(diff)
            r["status"] = f"refused: {r['refused']} (as {name_of(ref)})"
            refused.append(r)
    return refused


def pareto_front(rows: list[dict[str, Any]], objectives: tuple[str, ...]) -> list[dict[str, Any]]:
    """Rows not dominated in ``objectives``; rows with a missing/NaN objective are skipped."""
    ok = [r for r in rows if _ok(r, objectives)]

    def dominates(a: dict, b: dict) -> bool:
        return (all(sign(o) * a[o] <= sign(o) * b[o] for o in objectives)
                and any(sign(o) * a[o] < sign(o) * b[o] for o in objectives))

    front = [r for r in ok if not any(dominates(o, r) for o in ok if o is not r)]
    return sorted(front, key=lambda r: sign(objectives[0]) * r[objectives[0]])


def hypervolume(rows: list[dict[str, Any]], objectives: tuple[str, str], ref: tuple[float, float]) -> float:
    """Area of the objective plane dominated by ``rows`` and bounded by the reference point ``ref`` (one worst
    value per objective, in its own direction); rows no better than ``ref`` on both objectives add nothing."""
    q, f = objectives
    pts = sorted((sign(q) * r[q], sign(f) * r[f]) for r in pareto_front(rows, objectives))
    rq, rf = sign(q) * ref[0], sign(f) * ref[1]
    area, last_f = 0.0, rf
    for x, y in pts:  # sorted by the first objective (best first); the second then improves along the front
        if x < rq and y < last_f:
            area += (rq - x) * (last_f - y)
            last_f = y
    return area


def interval(r: dict[str, Any], metric: str) -> tuple[float, float]:
    """The row's 95% interval of ``metric`` (the point itself when it has none)."""
    ci = r.get(f"{metric}_ci")
    return (float(ci[0]), float(ci[1])) if ci else (float(r[metric]), float(r[metric]))


def verdict(metric: str, diff: list[float]) -> str:
    """'better' / 'worse' when the interval [lo, hi] of the difference d (point - reference) excludes 0, else
    'not distinguishable' (these samples show no difference)."""
    _, lo, hi = diff
    if lo <= 0 <= hi:
        return NOT_DISTINGUISHABLE
    return "better" if sign(metric) * (hi if hi < 0 else lo) < 0 else "worse"


def feasibility(rows: list[dict[str, Any]], limits: dict[str, float], quality: str) -> dict[str, Any]:
    """Best quality among rows meeting every fairness limit (metric <= limit); else the closest row.

    Returns {"best": row or None, "closest": row or None, "violation": largest (metric - limit) of the
    closest row}. Rows without the limited metrics are ignored.
    """
    ok = [r for r in rows if _ok(r, (quality, *limits))]
    feasible = [r for r in ok if all(r[m] <= x for m, x in limits.items())]
    if feasible:
        return {"best": min(feasible, key=lambda r: sign(quality) * r[quality]), "closest": None, "violation": 0.0}
    if not ok:
        return {"best": None, "closest": None, "violation": None}
    closest = min(ok, key=lambda r: max(r[m] - x for m, x in limits.items()))
    return {"best": None, "closest": closest, "violation": max(closest[m] - x for m, x in limits.items())}


def is_trial(r: dict[str, Any]) -> bool:
    """A trial's row, not a reference's."""
    return r.get("role", "trial") == "trial"


def name_of(r: dict[str, Any]) -> str:
    """A reference by its role; a trial by its number and Tune id (``t03 08ea3b18``), as the console's table."""
    if not is_trial(r):
        return r.get("role")
    return (f"t{r['number']:02d} " if r.get("number") else "") + str(r.get("trial_id"))


def table_columns(rows: list[dict[str, Any]], objectives: tuple[str, ...], metrics: tuple[str, ...]) -> list[str]:
    cols = ["role", "trial_id"]
    for m in (*objectives, *(m for m in metrics if m not in objectives)):
        if any(r.get(m) is not None for r in rows):
            cols.append(m)
            if any(r.get(f"{m}_ci") for r in rows):
                cols += [f"{m}_ci_lo", f"{m}_ci_hi"]
    return cols + ["run_id", "status"] + sorted({k for r in rows for k in r.get("params", {})})


def _cell(r: dict[str, Any], c: str) -> Any:
    for suffix, i in (("_ci_lo", 0), ("_ci_hi", 1)):
        if c.endswith(suffix) and r.get(c[:-len(suffix)] + "_ci"):
            return r[c[:-len(suffix)] + "_ci"][i]
    return r.get(c, r.get("params", {}).get(c, ""))


def write_table(path: Path, rows: list[dict[str, Any]], cols: list[str]) -> Path:
    """A CSV of ``rows`` with the columns ``cols`` (``table_columns``): an interval as ``<metric>_ci_lo`` and
    ``_ci_hi``, a trial's params by their keys."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for r in rows:
            w.writerow([_cell(r, c) for c in cols])
    return path


def write_front(out: Path, rows: list[dict[str, Any]], front: list[dict[str, Any]], references: list[dict[str, Any]],
                objectives: tuple[str, str], metrics: tuple[str, ...], overfitting: str | None = None
                ) -> dict[str, Path]:
    """pareto.csv (references, then the front), trials.csv (references, then every trial), differences.csv (each
    point minus each reference, with the 95% interval of the difference), tradeoff.png (with its over-fitting
    panel: ``plot_front``) and best_configs.json in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    cols = table_columns([*references, *rows], objectives, metrics)
    write_table(out / "pareto.csv", [*references, *front], cols)
    write_table(out / "trials.csv", [*references, *rows], cols)
    with open(out / "differences.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["point", "reference", "metric", "difference", "ci_lo", "ci_hi", "verdict"])
        for r in [*references, *rows]:
            for ref, diffs in r.get("differences", {}).items():
                for m, d in diffs.items():
                    w.writerow([name_of(r), ref, m, *d, verdict(m, d)])
    plot_front(out / "tradeoff.png", rows, front, references, objectives, overfitting)
    ok = [r for r in rows if _ok(r, objectives)]
    best = {o: min(ok, key=lambda r: sign(o) * r[o]) for o in objectives} if ok else {}
    (out / "best_configs.json").write_text(json.dumps(
        {o: {"trial_id": r["trial_id"], o: r[o], f"{o}_ci": r.get(f"{o}_ci"), "params": r.get("params", {}),
             "run_id": r.get("run_id")} for o, r in best.items()}, indent=2, default=str))
    return {n: out / n for n in ("pareto.csv", "trials.csv", "differences.csv", "tradeoff.png", "best_configs.json")}


def plot_front(path: Path, rows: list[dict[str, Any]], front: list[dict[str, Any]], references: list[dict[str, Any]],
               objectives: tuple[str, str], overfitting: str | None = None) -> list[tuple[str, str]]:
    """Every trial and reference with its 95% intervals as error bars, the front joined by a line: quality against
    fairness, and beside it (``overfitting``, when any point measured it) over-fitting against fairness, the same
    points and references. Returns each panel's (x label, y label)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    q, fair = objectives
    panels = [(q, fair)]
    if overfitting and any(_ok(r, (overfitting, fair)) for r in [*references, *rows]):
        panels.append((overfitting, fair))
    fig, axes = plt.subplots(1, len(panels), figsize=(7.5 * len(panels), 5), squeeze=False)
    features = next((r.get("fid_features") for r in [*references, *rows] if r.get("fid_features")), "")
    on_front = {id(r) for r in front}
    labels = []
    for ax, (x_metric, y_metric) in zip(axes[0], panels):
        def draw(rs: list[dict[str, Any]], **kw: Any) -> None:
            _error_bars(ax, rs, x_metric, y_metric, **kw)

        draw([r for r in rows if id(r) not in on_front], fmt="o", color="0.6", label="trials")
        draw(front, fmt="o", color="C0", label="Pareto front")
        joined = [r for r in front if _ok(r, (x_metric, y_metric))]
        if len(joined) > 1 and x_metric == q:
            ax.plot([r[x_metric] for r in joined], [r[y_metric] for r in joined], "-", color="C0", linewidth=1)
        for r, (marker, color) in zip(references, [("*", "C3"), ("D", "C2"), ("s", "C4")]):
            draw([r], fmt=marker, color=color, markersize=12 if marker == "*" else 8,
                 label=f"{REFERENCE_LABELS.get(r.get('role'), r.get('role'))} ({r.get('role')})")
        labels.append((AXIS_LABELS.get(x_metric, x_metric).format(features=features),
                       AXIS_LABELS.get(y_metric, y_metric)))
        ax.set_xlabel(labels[-1][0])
        ax.set_ylabel(labels[-1][1])
        ax.set_title("95% intervals as error bars" + ("" if x_metric == q else "; the front's points in blue"),
                     fontsize=9)
        ax.legend(fontsize=8)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return labels


def _error_bars(ax: Any, rs: list[dict[str, Any]], x_metric: str, y_metric: str, **kw: Any) -> None:
    """The rows of ``rs`` that measured both metrics, with their 95% intervals as error bars."""
    rs = [r for r in rs if _ok(r, (x_metric, y_metric))]
    if not rs:
        return
    xerr = [[r[x_metric] - interval(r, x_metric)[0] for r in rs], [interval(r, x_metric)[1] - r[x_metric] for r in rs]]
    yerr = [[r[y_metric] - interval(r, y_metric)[0] for r in rs], [interval(r, y_metric)[1] - r[y_metric] for r in rs]]
    ax.errorbar([r[x_metric] for r in rs], [r[y_metric] for r in rs], xerr=xerr, yerr=yerr, linestyle="none",
                capsize=2, elinewidth=0.8, **kw)


def digits(metric: str) -> int:
    """Decimals a metric is printed with: FIDs are tens, a generalization gap of losses about 1e-3."""
    return 2 if metric.startswith("fid") else 4 if metric == "generalization_gap" else 3


def format_front(front: list[dict[str, Any]], references: list[dict[str, Any]], objectives: tuple[str, str],
                 metrics: tuple[str, ...]) -> str:
    """Markdown table: references, then the front; objectives with their intervals, the other metrics, params."""
    shown = [*references, *front]
    cols = [m for m in (*objectives, *(m for m in metrics if m not in objectives)) if any(
        r.get(m) is not None for r in shown)]

    def cell(r: dict[str, Any], c: str) -> str:
        k = digits(c)
        ci = r.get(f"{c}_ci")
        if not isinstance(r.get(c), (int, float)):
            return str(r.get(c) or "-")
        return _num(r.get(c), k) + (f" [{_num(ci[0], k)}, {_num(ci[1], k)}]" if ci else "")

    lines = ["| " + " | ".join(["point", *cols, "params"]) + " |", "|" + " --- |" * (len(cols) + 2)]
    for r in shown:
        params = ", ".join(f"{k}={_fmt(v)}" for k, v in sorted(r.get("params", {}).items()))
        lines.append("| " + " | ".join([name_of(r), *(cell(r, c) for c in cols), params]) + " |")
    return "\n".join(lines)


def format_differences(front: list[dict[str, Any]], references: list[dict[str, Any]],
                       objectives: tuple[str, ...]) -> str:
    """Markdown table: each printed point minus each reference on each objective, with the 95% interval of the
    difference and, where it excludes 0, whether the point is better or worse."""
    pairs = [(ref["role"], o) for ref in references for o in objectives]
    lines = ["| " + " | ".join(["point", *(f"{o} - {role}" for role, o in pairs)]) + " |",
             "|" + " --- |" * (len(pairs) + 1)]
    for r in [*references[1:], *front]:
        cells = []
        for role, o in pairs:
            d = r.get("differences", {}).get(role, {}).get(o)
            k = digits(o)
            v = verdict(o, d) if d else ""
            cells.append(f"{d[0]:+.{k}f} [{d[1]:+.{k}f}, {d[2]:+.{k}f}]"
                         + (f" {v}" if v != NOT_DISTINGUISHABLE else "") if d else "-")
        lines.append("| " + " | ".join([name_of(r), *cells]) + " |")
    return "\n".join(lines)


def format_feasibility(result: dict[str, Any], limits: dict[str, float], quality: str) -> str:
    target = " and ".join(f"{m} <= {x:g}" for m, x in limits.items())
    if result["best"] is not None:
        r = result["best"]
        return (f"best trial meeting {target}: {name_of(r)} ({quality} {_num(r[quality], 3)}, "
                + ", ".join(f"{m} {_num(r[m], 3)}" for m in limits) + f"; run {r.get('run_id')})")
    if result["closest"] is None:
        return f"no trial reported {target}"
    r = result["closest"]
    return (f"no trial met {target}; closest: {name_of(r)} ("
            + ", ".join(f"{m} {_num(r[m], 3)}" for m in limits) + f", {_num(result['violation'], 3)} over the target)")


def _num(v: Any, digits: int = 2) -> str:
    return f"{v:.{digits}f}" if isinstance(v, (int, float)) else "-"


def _fmt(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)
