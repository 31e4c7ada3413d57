"""Training-seed confirmation (``--confirm-seeds K``): the points a sweep's conclusions rest on, re-trained with K
further training seeds and restated as the mean over their seeds.

A run's intervals cover its evaluation's sampling noise only; the same configuration trained with another seed can
land farther away than any of them shows. So after the trials the sweep re-trains, with ``optim.train_seed`` = its
training seed + k for k = 1..K, replicates: new data order, training noise and timesteps, and new sample noise in
the evaluation; the same data split, warm start, steps, labeller and reference images. Seed k of a point and seed k
of a reference share their sample noise, so they are still compared sample by sample.

1. both references and the front's two extreme points (the best on each objective): always; under a time budget
   the plan reserves their runs (``cdd_ray.budget.Shape.confirm_*``), since every verdict is against a reference and
   the extremes are the front's two claims;
2. the rest of the front, in the front's order, as far as the time left holds them (all of it without a budget).

The runs go seed by seed (every chosen point's seed 1, then seed 2, ...), each a child of the sweep's MLflow run
(tags ``role=confirm``, ``confirms``: the trial id or reference role, ``train_seed``), its outputs in the store's
``confirm/<key>-s<k>`` and reused from there by a resumed sweep; one that fails is said and left out (its point
keeps the seeds before it). Then every confirmed point is restated over its seeds (``cdd_ray.seeds``: the mean, an
interval holding the seed spread), with its differences to each reference combined from the per-seed paired
differences, and the front is recomputed among the confirmed points. The single-seed rows are not changed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from cdd_ray import compare, storage as storage_io
from cdd_ray.config import Config, ConfigError, config_from_dict, validate
from cdd_ray.config.schema import FaultConfig
from cdd_ray.front import is_trial, name_of, pareto_front
from cdd_ray.metrics import SWEEP_METRICS
from cdd_ray.seeds import combine, combine_differences

ROLE = "confirm"
Seeds = list[tuple[dict[str, Any], compare.Evaluated]]  # a point's (row, evaluation) of seed 0, 1, ...


def key_of(row: dict[str, Any]) -> str:
    """What a confirmation confirms: a trial's id, a reference's role."""
    return str(row["trial_id"]) if is_trial(row) else row["role"]


def own_folder(row: dict[str, Any], store: str, outputs: str) -> str:
    """A point's own (seed 0) outputs in the run storage."""
    return storage_io.join(outputs, str(row["trial_id"])) if is_trial(row) else storage_io.join(store, row["role"])


def seed_folder(row: dict[str, Any], k: int) -> str:
    """Where seed ``k``'s run of ``row`` lives, under the sweep's store (or the driver's sweep folder)."""
    return f"{ROLE}/{key_of(row)}-s{k}"


def comparable(references: list[dict[str, Any]], store: str, outputs: str) -> tuple[list[dict[str, Any]], list[str]]:
    """The references a confirmation can judge against (not refused, evaluated), and what it leaves out, said."""
    ok = [r for r in references if not r.get("refused") and compare.load(own_folder(r, store, outputs)) is not None]
    return ok, [f"{name_of(r)} ({'refused' if r.get('refused') else 'no evaluation to compare'})"
                for r in references if r not in ok]


def choose(front: list[dict[str, Any]], references: list[dict[str, Any]], seeds: int,
           run_s: float | None = None, seconds_left: float | None = None) -> list[dict[str, Any]]:
    """The points to confirm (module doc): the references and the front's extremes (``front`` is sorted by its
    first objective, so its ends are the best on each), then the rest of the front while ``seconds_left`` holds
    ``seeds`` runs of ``run_s`` seconds for each (all of it when either is None)."""
    ends = [front[0], front[-1]] if front else []
    chosen = [*references, *(r for i, r in enumerate(ends) if r not in ends[:i])]
    rest = [r for r in front if r not in chosen]
    if run_s is None or seconds_left is None or run_s <= 0:
        return chosen + rest
    more = max(0, int((seconds_left - len(chosen) * seeds * run_s) // (seeds * run_s)))
    return chosen + rest[:more]


def confirm_config(folder: str, row: dict[str, Any], sweep: str, k: int) -> Config:
    """The config of ``row``'s run (its config.json in ``folder``) with training seed + ``k``, no fault injected and
    no monitored constraint losses (a baseline's: they would cost batches and tell the verdict nothing)."""
    text = storage_io.read_text(storage_io.join(folder, "config.json"))
    if text is None:
        raise ConfigError(f"--confirm-seeds: {name_of(row)} has no config.json in {folder!r} to re-train")
    cfg = config_from_dict(json.loads(text))
    cfg.optim.train_seed = cfg.optim.draws_seed + k
    cfg.optim.monitor_constraints = False
    cfg.fault = FaultConfig()
    cfg.name = f"{sweep}-{ROLE}-{key_of(row)}-s{k}"
    validate(cfg)
    return cfg


def run_confirmations(targets: list[dict[str, Any]], seeds: int, store: str, outputs: str, sweep_dir: Path,
                      sweep: str, run: Callable[..., dict[str, Any]]) -> list[str]:
    """Each target's ``seeds`` further runs, seed by seed. ``run(make_config, out, tags, store)``: one child run
    (``cdd_ray.sweep.references.run_child`` with the sweep's storage, MLflow run and console). A run that fails is
    said and the sweep goes on; returns what failed."""
    failed = []
    for k in range(1, seeds + 1):
        for row in targets:
            where = seed_folder(row, k)
            done = storage_io.read_text(storage_io.join(store, where, "summary.json")) is not None
            try:
                cfg = confirm_config(own_folder(row, store, outputs), row, sweep, k)
                print(f"confirm: {name_of(row)} with training seed {cfg.optim.train_seed}"
                      + (" (done before)" if done else ""), flush=True)
                run(lambda cfg=cfg: cfg, sweep_dir / where,
                    {"sweep": sweep, "role": ROLE, "confirms": key_of(row), "confirms_run": str(row.get("run_id")),
                     "train_seed": str(cfg.optim.train_seed)}, storage_io.join(store, where))
            except (KeyboardInterrupt, SystemExit):
                raise
            except Exception as e:  # noqa: BLE001 - one replicate is not worth the sweep's front: said, left out
                failed.append(f"{name_of(row)} seed +{k}: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
                print(f"confirm: {failed[-1]}; the point keeps the seeds before it", flush=True)
    return failed


def seed_runs(targets: list[dict[str, Any]], seeds: int, store: str, outputs: str) -> dict[str, Seeds]:
    """{key: [(row, evaluation) of seed 0, 1, ...]}: a copy of the point's own row, then each confirmation's
    summary as a row; a seed whose run left no evaluation ends the list there."""
    runs = {}
    for row in targets:
        own = compare.load(own_folder(row, store, outputs))
        seq = [(dict(row), own)] if own is not None else []
        for k in range(1, seeds + 1):
            e = compare.load(storage_io.join(store, seed_folder(row, k))) if seq else None
            if e is None:
                break
            seq.append(({m: e.summary.get(m) for m in SWEEP_METRICS}
                        | {f"{m}_ci": e.summary[f"{m}_ci"] for m in SWEEP_METRICS if e.summary.get(f"{m}_ci")}, e))
        runs[key_of(row)] = seq
    return runs


def restate_class_quality(runs: dict[str, Seeds]) -> list[str]:
    """Every seed's class-mean quality over the classes all of the confirmed runs have (the single-seed front's
    class set may be wider: a second seed can generate too few samples of a class). Returns those classes."""
    classes = compare.common_classes([e for seq in runs.values() for _, e in seq])
    for seq in runs.values():
        for row, e in seq:
            compare.restate_class_quality(row, e, classes)
    return classes


def over_seeds(target: dict[str, Any], seq: Seeds) -> dict[str, Any]:
    """``target``'s row over its seeds: every metric's mean with its combined interval (``<metric>_seeds``: the
    values) and ``seeds``."""
    row = {k: target[k] for k in ("role", "trial_id", "number", "run_id", "params", "status", "steps",
                                  "train_images", "lr", "fid_features", "data_source") if k in target}
    row["seeds"] = len(seq)
    row["quality_classes"] = seq[0][0].get("quality_classes")
    for m in SWEEP_METRICS:
        values = [r.get(m) for r, _ in seq]
        if all(isinstance(v, (int, float)) for v in values):
            row[m], ci = combine(values, [r.get(f"{m}_ci") for r, _ in seq])
            row[f"{m}_seeds"] = values
            if any(r.get(f"{m}_ci") for r, _ in seq) or len(set(values)) > 1:  # a floor has no spread
                row[f"{m}_ci"] = ci
    return row


def combined_differences(seq: Seeds, ref_seq: Seeds, metrics: tuple[str, ...], classes: list[str]
                         ) -> dict[str, list[float]]:
    """{metric: [d, lo, hi]}: point - reference over the seeds both have, seed k against seed k (the same sample
    noise: ``cdd_ray.compare.difference`` pairs them), combined (``cdd_ray.seeds.combine_differences``)."""
    n = min(len(seq), len(ref_seq))
    out = {}
    for m in metrics:
        per_seed = [compare.difference(m, seq[k][1], ref_seq[k][1], classes) for k in range(n)]
        if n and all(d is not None for d in per_seed):
            out[m] = combine_differences(per_seed)
    return out


def restate(targets: list[dict[str, Any]], runs: dict[str, Seeds], metrics: tuple[str, ...]
            ) -> list[dict[str, Any]]:
    """Each target with an evaluation, over its seeds (``over_seeds``), with ``differences`` {reference role:
    {metric: [d, lo, hi]}} to every other reference among the targets (``combined_differences``)."""
    classes = restate_class_quality(runs)
    refs = [t for t in targets if not is_trial(t)]
    out = []
    for target in targets:
        seq = runs.get(key_of(target), [])
        if seq:
            row = over_seeds(target, seq)
            row["differences"] = {ref["role"]: combined_differences(seq, runs.get(key_of(ref), []), metrics, classes)
                                  for ref in refs if ref is not target}
            out.append(row)
    return out


def confirmed_front(confirmed: list[dict[str, Any]], objectives: tuple[str, str]) -> list[dict[str, Any]]:
    """The front among the confirmed trials, on their values over seeds."""
    return pareto_front([r for r in confirmed if is_trial(r)], objectives)
