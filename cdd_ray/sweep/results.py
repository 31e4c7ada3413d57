"""What a sweep ends with: its rows (references and trials), each point's differences to the references, the front,
with ``--confirm-seeds`` the confirmed points and their verdict, the budget line, what the jobs print and the parent
run's MLflow description."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cdd_ray import compare, tracking
from cdd_ray import storage as storage_io
from cdd_ray.front import (format_differences, format_feasibility, format_front, is_trial, name_of, table_columns,
                           write_front, write_table)
from cdd_ray.metrics import BUDGET_COLUMNS, OBJECTIVES, OVERFITTING_METRICS, SWEEP_METRICS, direction
from cdd_ray.verdict import format_verdict, write_verdict


@dataclass
class SweepResult:
    parent_run_id: str
    rows: list[dict[str, Any]]
    front: list[dict[str, Any]]
    baseline: dict[str, Any]  # the unconstrained reference (continued for the trials' budget when warm-started)
    out: Path
    objectives: tuple[str, str] = OBJECTIVES
    references: list[dict[str, Any]] = field(default_factory=list)  # the unconstrained and rebalanced rows
    overfitting: str = "copy_rate"  # the over-fitting measure shown beside the objectives (--overfitting)
    limits: dict[str, float] = field(default_factory=dict)  # fairness targets (--max-tv, --max-fd)
    feasible: dict[str, Any] = field(default_factory=dict)  # front.feasibility() of the trials under limits
    plan: dict[str, Any] = field(default_factory=dict)  # the time budget's Plan (empty: no budget)
    wall_s: float = 0.0  # of this call of run_sweep (a resumed sweep: since the resume)
    store: str = ""  # the sweep's folder in the run storage (what --resume and the trials read)
    budget_knobs: list[str] = field(default_factory=list)  # searched keys that change compute or optimiser
    study: str = ""  # the Optuna study's storage URL
    study_states: dict[str, int] = field(default_factory=dict)  # Optuna's trial states at the end: count each
    confirm_seeds: int = 0  # --confirm-seeds: further training seeds of the confirmed points
    confirmed: list[dict[str, Any]] = field(default_factory=list)  # references, then trials, over their seeds
    confirmed_front: list[dict[str, Any]] = field(default_factory=list)  # the front among the confirmed trials
    verdict: list[dict[str, Any]] = field(default_factory=list)  # cdd_ray.verdict.verdict_rows
    confirm_left_out: list[str] = field(default_factory=list)  # references without an evaluation, failed runs
    confirm_dropped: bool = False  # --confirm-seeds asked, but the time budget could not hold the runs

    @property
    def verdict_metrics(self) -> tuple[str, ...]:
        """What the verdict judges: quality, fairness, over-fitting."""
        return (*self.objectives, self.overfitting)


def close_stopped_children(uri: str, parent_run_id: str, status: str = "FAILED") -> None:
    """The sweep's trial runs still RUNNING when it ends get ``status``: KILLED on Ctrl-C (every running trial);
    FAILED after the trials, where only a trial whose process died can have left one (ASHA's stopped trials are
    FINISHED by mark_stopped_early first)."""
    c = tracking.client(uri)
    exp = c.get_run(parent_run_id).info.experiment_id
    for r in c.search_runs([exp], filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}' and "
                                                "attributes.status = 'RUNNING'"):
        tracking.end_run(uri, r.info.run_id, status)


def diff_metrics(objectives: tuple[str, str]) -> tuple[str, ...]:
    """The metrics every point's differences to the references are given for: the objectives, the mix-free quality
    and fairness measures, the over-fitting measures."""
    return tuple(dict.fromkeys(m for m in (*objectives, "precision_class_mean", "fid_class_mean", "tv_excess",
                                           "minority_share", *OVERFITTING_METRICS) if m in compare.DIFF_METRICS))


def compare_runs(references: list[dict[str, Any]], rows: list[dict[str, Any]], store: str, outputs: str,
                 objectives: tuple[str, str]) -> None:
    """Every evaluated run that is not refused, as ``cdd_ray.compare`` reads it: its class-mean quality restated
    over the classes all of them have (``quality_classes``), and its ``differences`` to each reference
    (``diff_metrics``, each with the 95% interval of the difference)."""
    folders = [(r, storage_io.join(store, r["role"])) for r in references]
    folders += [(r, storage_io.join(outputs, str(r["trial_id"]))) for r in rows if r["status"] == "done"]
    runs = [(r, e) for r, folder in folders if not r.get("refused") and (e := compare.load(folder)) is not None]
    classes = compare.common_classes([e for _, e in runs])
    for r, e in runs:
        compare.restate_class_quality(r, e, classes)
    refs = {r["role"]: e for r, e in runs if not is_trial(r)}
    for r, e in runs:
        r["differences"] = compare.differences(e, refs, diff_metrics(objectives), classes)


def budget_line(res: SweepResult) -> str:
    """The budget of every printed point, checkable: steps, images through the gradient step, learning rate."""
    def span(rows: list[dict[str, Any]], key: str) -> str:
        vals = sorted({r[key] for r in rows if isinstance(r.get(key), (int, float))})
        return "-" if not vals else f"{vals[0]:g}" if len(vals) == 1 else f"{vals[0]:g}-{vals[-1]:g}"

    done = [r for r in res.rows if r["status"] == "done"]
    line = (f"budget: references {span(res.references, 'steps')} steps at lr {span(res.references, 'lr')} "
            f"({span(res.references, 'train_images')} training images); finished trials {span(done, 'steps')} "
            f"steps at lr {span(done, 'lr')} ({span(done, 'train_images')} images: the objective's batches plus "
            "one batch per constraint)")
    return line + (".\n" + "NOT AT EQUAL BUDGET: the space searches " + ", ".join(res.budget_knobs) + "."
                   if res.budget_knobs else ".")


def sweep_note(res: SweepResult, sampler: str, budget: str) -> str:
    """The sweep parent run's description in MLflow (Markdown): what was searched for, the equal budget, and the
    front with its intervals beside the references (what the job prints)."""
    q, f = res.objectives
    better = {o: direction(o) for o in res.objectives}
    target = (" under " + " and ".join(f"{m} <= {x:g}" for m, x in res.limits.items())) if res.limits else ""
    return "\n\n".join([
        f"**Sweep {res.out.name}**: {len(res.rows)} trials searched by Optuna ({sampler}) on Ray Tune for {q} "
        f"({better[q]} is better) and {f} ({better[f]} is better){target}.",
        f"**Budget**: {budget}.", report(res)])


def mark_stopped_early(uri: str, rows: list[dict[str, Any]], outputs: str) -> None:
    """A trial ASHA stopped ended as the search meant it to: its run is FINISHED with tags ``stopped_early=true``
    and ``stopped_at_step`` (KILLED is for a person's Ctrl-C). Ray ends the trial's process from outside, so the
    run was left RUNNING, or FAILED where the stop landed inside the trial's own clean-up. ``outputs``: the
    trials' folder in the run storage."""
    for r in rows:
        if r["status"] != "stopped early":
            continue
        run_id = storage_io.read_text(storage_io.join(outputs, str(r.get("trial_id")), "mlflow_run_id"))
        if run_id:
            tracking.set_tags(uri, run_id.strip(), {"stopped_early": "true", "stopped_at_step": str(r.get("steps"))})
            tracking.end_run(uri, run_id.strip(), "FINISHED")


def trial_rows(results, outputs: str, param_keys: list[str], objectives: tuple[str, str]) -> list[dict[str, Any]]:
    """One row per trial: a finished trial's summary.json (metrics with their intervals), else what it reported
    before ASHA stopped it. ``outputs``: the trials' folder in the run storage."""
    rows = []
    for number, r in enumerate(results, 1):  # the ResultGrid keeps Tune's order of the trials
        m = r.metrics or {}
        out = storage_io.join(outputs, str(m.get("trial_id", "")))
        info = json.loads(storage_io.read_text(storage_io.join(out, "trial.json")) or "{}")
        summary = json.loads(storage_io.read_text(storage_io.join(out, "summary.json"))) if info else m
        rows.append({"role": "trial", "trial_id": m.get("trial_id"), "number": number,
                     **{k: summary.get(k) for k in SWEEP_METRICS},
                     **{f"{k}_ci": summary[f"{k}_ci"] for k in SWEEP_METRICS if summary.get(f"{k}_ci")},
                     **{k: summary.get(k, m.get("step") if k == "steps" else None) for k in BUDGET_COLUMNS},
                     "fid_features": summary.get("fid_features"), "data_source": summary.get("data_source"),
                     "run_id": info.get("run_id"),
                     "status": "error" if r.error else ("done" if info else "stopped early"),
                     "params": {k: (r.config or {}).get(k) for k in param_keys}})
    return rows


def report(res: SweepResult) -> str:
    """What the jobs print: the front with its intervals and references, the fairness target's answer, where
    everything is."""
    q, f = res.objectives
    done = sum(r["status"] == "done" for r in res.rows)
    lines = [f"Pareto front ({q} {direction(q)} is better, {f} {direction(f)} is better; {len(res.rows)} trials, "
             f"{done} finished, {len(res.front)} on the front). Values with 95% bootstrap intervals:",
             format_front(res.front, res.references, res.objectives, (*SWEEP_METRICS, "quality_classes"))]
    if any(r.get("differences") for r in [*res.references, *res.front]):
        lines += ["Differences to the references (point - reference, with the 95% interval of the difference: paired "
                  "over the shared sampling noise for shares and precision, FIDs from independent bootstraps; "
                  "'better' / 'worse' where it excludes 0, otherwise these samples show no difference; all "
                  "metrics in front/differences.csv):",
                  format_differences(res.front, res.references, (*res.objectives, res.overfitting))]
    if res.confirmed:
        lines += confirmation_lines(res)
    elif res.confirm_dropped:
        lines.append("NOT CONFIRMED over training seeds: the time budget could not hold the confirmation runs beside "
                     "the smallest sweep (the plan says what would: front/plan.json); every interval above covers "
                     "the evaluation's sampling noise only.")
    floor = next((r.get("tv_floor") for r in res.references if r.get("tv_floor") is not None), None)
    if floor is not None:
        lines.append(f"tv_floor {floor:.3f}: the tv_to_uniform of an exactly uniform generator with this many samples "
                     "(tv_excess = tv_to_uniform - tv_floor).")
    classes = next((r["quality_classes"] for r in [*res.references, *res.rows] if r.get("quality_classes") is not None),
                   None)
    if classes is not None:
        lines.append(f"fid_class_mean and precision_class_mean average the same classes for every point: "
                     f"{classes or 'none'} (the classes every evaluated run generated enough samples of).")
    refused = [r for r in res.rows if r.get("refused")]
    if refused:
        lines.append("refused (evaluated on other data or features than the references, kept off the front): "
                     + ", ".join(f"{name_of(r)} ({r['refused']})" for r in refused))
    if res.limits:
        lines.append(format_feasibility(res.feasible, res.limits, q))
    lines.append(budget_line(res))
    if res.study:
        lines.append("Optuna study: " + ", ".join(f"{n} {k}" for k, n in sorted(res.study_states.items()))
                     + f" trials; see it with: optuna-dashboard {res.study}")
    if res.plan:
        lines.append(plan_line(res.plan, res.wall_s))
    lines += [f"sweep folder: {res.out}  (front/pareto.csv, front/differences.csv, front/tradeoff.png, "
              "front/best_configs.json" + (", front/confirmed.csv, front/verdict.csv" if res.confirmed else "") + ")"
              + (f"; the sweep's state and outputs: {res.store}" if res.store and res.store != str(res.out) else ""),
              f"MLflow parent run: {res.parent_run_id}"]
    return "\n".join(lines)


def confirmation_lines(res: SweepResult) -> list[str]:
    """The confirmed points over their training seeds, the front among them, and the verdict."""
    refs = [r for r in res.confirmed if not is_trial(r)]
    trials = [r for r in res.confirmed if is_trial(r)]
    off = [name_of(r) for r in trials if not any(r is f for f in res.confirmed_front)]
    seeds = sorted({r["seeds"] for r in res.confirmed})
    which = (f"{len(refs)} reference(s) and {len(trials)} of the front's {len(res.front)} point(s)"
             + (" (the plan holds the references and the front's two ends; the rest as the time left held)"
                if res.plan and len(trials) < len(res.front) else ""))
    return [
        f"Confirmed over {'-'.join(map(str, dict.fromkeys([seeds[0], seeds[-1]])))} training seeds "
        f"(--confirm-seeds {res.confirm_seeds}): {which}; each value the mean over its seeds, its 95% interval "
        "holding the seed-to-seed spread and the sampling noise (docs/EVALUATION.md); the front recomputed among "
        "the confirmed trials:",
        format_front(res.confirmed_front, refs, res.objectives, (*SWEEP_METRICS, "quality_classes")),
        *([f"confirmed but off the front over seeds: {', '.join(off)}"] if off else []),
        *([f"left out of the confirmation: {'; '.join(res.confirm_left_out)}"] if res.confirm_left_out else []),
        "Verdict over the seeds (point - reference: the per-seed paired differences combined, with their 95% "
        "interval; 'better' / 'worse' where it excludes 0; all confirmed points in front/verdict.csv):",
        format_verdict(res.verdict, res.verdict_metrics)]


def plan_line(pl: dict[str, Any], wall_s: float) -> str:
    """The time plan as the report states it: what ran against what was asked."""
    sizes = pl.get("sizes") or {}
    asked = pl.get("requested") or {"trials": pl.get("requested_trials"), "trial_steps": pl.get("requested_steps")}
    base = f"the baseline at {sizes['baseline_steps']} steps, " if sizes else ""
    samples = f", {sizes['samples']} evaluation samples each" if sizes else ""
    return (f"time budget {pl['budget_s'] / 60:.0f} min, took {wall_s / 60:.1f} min: {base}{pl['num_trials']} trials "
            f"and the references at {pl['trial_steps']} steps{samples} (asked: {asked['trials']} x "
            f"{asked['trial_steps']}); {pl['cut']}")


def publish(uri: str, res: SweepResult, upload_to: str, sampler: str) -> None:
    """The front's files in ``res.out/front`` (and the plan beside them; with a confirmation its points over their
    seeds in confirmed.csv and the verdict in verdict.csv), uploaded with the study to ``upload_to`` (a URI storage's
    sweep folder; "" for none), logged to the parent run with the sweep's metrics (each reference's as
    ``<role>/<metric>``) and tags."""
    front_dir, metrics = res.out / "front", (*SWEEP_METRICS, "quality_classes", *BUDGET_COLUMNS)
    write_front(front_dir, res.rows, res.front, res.references, res.objectives, metrics, res.overfitting)
    if res.plan:
        (front_dir / "plan.json").write_text(json.dumps(res.plan, indent=2))
    if res.confirmed:
        cols = table_columns(res.confirmed, res.objectives, ("seeds", *metrics))
        write_table(front_dir / "confirmed.csv", res.confirmed, cols)
        write_verdict(front_dir / "verdict.csv", res.verdict)
    if upload_to:
        storage_io.upload(front_dir, storage_io.join(upload_to, "front"))
    tracking.log_artifacts(uri, res.parent_run_id, front_dir)
    tracking.log_artifacts(uri, res.parent_run_id, res.out / "study", "study")
    if upload_to:
        storage_io.upload(res.out / "study", storage_io.join(upload_to, "study"))
    tracking.log_metrics(uri, res.parent_run_id, {
        "sweep/trials": len(res.rows), "sweep/front_size": len(res.front), **{
            f"{r['role']}/{k}": r[k] for r in res.references for k in SWEEP_METRICS  # e.g. baseline-continued/fid
            if isinstance(r.get(k), (int, float))}}, 0)
    tracking.set_tags(uri, res.parent_run_id, {"objectives": ",".join(res.objectives), "overfitting": res.overfitting,
                                               "sampler": sampler, "confirm_seeds": str(res.confirm_seeds), **{
        f"max_{m}": str(x) for m, x in res.limits.items()}})
