"""The verdict of a confirmed sweep (``--confirm-seeds``): every confirmed point against each reference, on quality,
fairness and over-fitting, as the difference over the training seeds with its 95% interval (``cdd_ray.seeds``:
the per-seed paired differences combined, the seed spread included) and a word: ``better`` or ``worse`` where the
interval excludes 0, else ``not distinguishable``. The rebalanced reference is judged against the unconstrained one
too: it is the obvious rival's own verdict.

Printed with the front (the confirmed front's points and the references), in the parent run's MLflow description,
and in ``front/verdict.csv`` (every confirmed point, ``on_front`` saying which are on the front over seeds).
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from cdd_ray.front import digits, is_trial, name_of, verdict

COLUMNS = ("point", "on_front", "reference", "metric", "seeds", "difference", "ci_lo", "ci_hi", "verdict")


def verdict_rows(confirmed: list[dict[str, Any]], front: list[dict[str, Any]], metrics: tuple[str, ...]
                 ) -> list[dict[str, Any]]:
    """One row per (confirmed point, reference, metric) with a combined difference: the references (but the first)
    against the others, then the confirmed trials (``confirmed`` holds both, references first, as
    ``cdd_ray.sweep.confirm.restate`` gives them). ``front``: the confirmed front's rows."""
    references = [r for r in confirmed if not is_trial(r)]
    seeds = {r["role"]: r["seeds"] for r in references}
    on_front = {id(r) for r in front}
    rows = []
    for point in [*references[1:], *(r for r in confirmed if is_trial(r))]:
        for ref in references:
            for m in metrics:
                d = point.get("differences", {}).get(ref["role"], {}).get(m)
                if ref is point or d is None:
                    continue
                rows.append({"point": name_of(point),
                             "on_front": id(point) in on_front if is_trial(point) else "-",
                             "reference": ref["role"], "metric": m, "seeds": min(point["seeds"], seeds[ref["role"]]),
                             "difference": d[0], "ci_lo": d[1], "ci_hi": d[2], "verdict": verdict(m, d)})
    return rows


def format_verdict(rows: list[dict[str, Any]], metrics: tuple[str, ...]) -> str:
    """Markdown: a line per (point, reference) of the references and the confirmed front's points, a column per
    metric: the difference [95% interval] and its word."""
    pairs = list(dict.fromkeys((r["point"], r["reference"], r["seeds"]) for r in rows if r["on_front"] is not False))
    cells = {(r["point"], r["reference"], r["metric"]): r for r in rows}
    lines = ["| " + " | ".join(["point", "reference", "seeds", *(f"{m} (point - reference)" for m in metrics)]) + " |",
             "|" + " --- |" * (len(metrics) + 3)]
    for point, ref, n in pairs:
        shown = []
        for m in metrics:
            r = cells.get((point, ref, m))
            k = digits(m)
            shown.append(f"{r['difference']:+.{k}f} [{r['ci_lo']:+.{k}f}, {r['ci_hi']:+.{k}f}] {r['verdict']}"
                         if r else "-")
        lines.append("| " + " | ".join([point, ref, str(n), *shown]) + " |")
    return "\n".join(lines)


def write_verdict(path: Path, rows: list[dict[str, Any]]) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)
    return path
