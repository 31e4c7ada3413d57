"""The comparisons a sweep's front is read by: every point's class-mix-free quality over one class set, and the 95%
interval of each point's *difference* to each reference (not the overlap of two intervals).

A run is compared through what its evaluation left (``Evaluated``): summary.json and evaluation.npz, the record
of ``cdd_ray.evaluation.run.Evaluation`` (each generated sample's class position and precision hit, each
reference image's recall hit, the bootstrap draws behind the FID intervals).

- One class set: ``fid_class_mean`` and ``precision_class_mean`` average over classes; a run drops a class with
  too few samples (at N = 500 an unconstrained model often has fewer than ``eval.class_fid_samples`` of a minority
  digit), so runs would be averaged over different classes. ``restate_class_quality`` re-averages every run over
  the classes every run has, with the same ``m`` (one config per sweep), and names them (``quality_classes``).
- Differences (point - reference) with the 95% interval of the difference:
  - class shares (``tv_to_uniform``, ``tv_excess``, ``fd``, ``minority_share``), ``precision``,
    ``precision_class_mean``: a paired bootstrap. Runs sampled with the same seed and N start sample i from the
    same noise, so their errors are correlated sample by sample; the same resampled indices in both keep that
    (independent resamples otherwise). ``recall``: paired over the shared reference images.
  - ``copy_rate``, ``copy_rate_features``: a paired bootstrap over the samples as for precision, each resample's
    rate over its samples of the over-fitting classes (``overfitting_classes``; each run's own labels).
  - ``generalization_gap``: a paired bootstrap over the gap's image pairs (``gap_differences``), the same images,
    noise and timesteps in both runs when they were evaluated on one split with one seed (independent resamples
    otherwise).
  - FIDs: each run's bootstrap draws (generated set and reference resampled apart) subtracted draw by draw and
    re-centred on the measured difference, as the runs' own FID intervals are. This treats the two runs as
    independent, ignoring the shared reference and noise, so the interval is if anything too wide.
  A difference is *shown* when its interval excludes 0 (``cdd_ray.front.verdict``).
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from cdd_ray import storage as storage_io
from cdd_ray.evaluation.fairness import percentile_interval, tv_floor
from cdd_ray.evaluation.quality import recentred_interval

SHARE_METRICS = ("tv_to_uniform", "tv_excess", "fd", "minority_share")
HIT_METRICS = ("precision", "precision_class_mean", "recall")
FID_METRICS = ("fid", "fid_data", "fid_class_mean")
COPY_METRICS = {"copy_rate": "copy_flags", "copy_rate_features": "copy_flags_features"}
DIFF_METRICS = (*SHARE_METRICS, *HIT_METRICS, *FID_METRICS, *COPY_METRICS, "generalization_gap")


@dataclass
class Evaluated:
    """One evaluated run as a sweep compares it."""
    summary: dict[str, Any]
    record: dict[str, np.ndarray]

    @property
    def positions(self) -> np.ndarray:
        return self.record["class_positions"]

    @property
    def n_classes(self) -> int:
        return len(self.summary["class_ids"])

    def class_pos(self, class_ids: list[str]) -> list[int]:
        return [[str(c) for c in self.summary["class_ids"]].index(c) for c in class_ids]


def load(folder: str) -> Evaluated | None:
    """The run's summary.json and evaluation.npz in ``folder`` (run storage: a path or a URI); None for a run that
    has none (stopped before its evaluation, or written before evaluation.npz existed)."""
    summary = storage_io.read_text(storage_io.join(folder, "summary.json"))
    raw = storage_io.read_bytes(storage_io.join(folder, "evaluation.npz"))
    if summary is None or raw is None:
        return None
    with np.load(io.BytesIO(raw)) as z:
        return Evaluated(json.loads(summary), {k: z[k] for k in z.files})


def common_classes(runs: list[Evaluated]) -> list[str]:
    """The classes (ids, as in ``fid_per_class``) that every run's per-class FID covers, in class order."""
    if not runs:
        return []
    ids = [str(c) for c in runs[0].summary["class_ids"]]
    return [c for c in ids if all(c in r.summary.get("fid_per_class", {}) for r in runs)]


def restate_class_quality(row: dict[str, Any], run: Evaluated, classes: list[str]) -> None:
    """``row``'s fid_class_mean and precision_class_mean (with their intervals) over ``classes`` only."""
    row["quality_classes"] = " ".join(classes)
    if not classes:  # no class that every run has: no class mean to compare
        for k in ("fid_class_mean", "fid_class_mean_ci", "precision_class_mean", "precision_class_mean_ci"):
            row[k] = None
        return
    pos = run.class_pos(classes)
    row["fid_class_mean"] = float(np.mean([run.summary["fid_per_class"][c] for c in classes]))
    draws = run.record.get("fid_class_draws")  # none when the run was evaluated without intervals
    row["fid_class_mean_ci"] = (recentred_interval(draws[:, pos].mean(1), row["fid_class_mean"])
                                if draws is not None else None)
    row["precision_class_mean"] = _class_mean_precision(run, np.arange(len(run.positions))[None], pos)[0]
    row["precision_class_mean_ci"] = percentile_interval(_class_mean_precision(run, _indices(run, 0), pos))


def _indices(run: Evaluated, seed: int, n: int | None = None) -> np.ndarray:
    resamples = int(run.summary.get("intervals", {}).get("resamples") or 1000)
    n = len(run.positions) if n is None else n
    return np.random.default_rng(seed).integers(0, n, (resamples, n))


def _shares(run: Evaluated, idx: np.ndarray) -> np.ndarray:
    """Class shares of each resample (rows of ``idx``), shape (resamples, classes)."""
    k, r = run.n_classes, idx.shape[0]
    flat = (run.positions[idx] + k * np.arange(r)[:, None]).ravel()
    return np.bincount(flat, minlength=r * k).reshape(r, k) / idx.shape[1]


def _class_mean_precision(run: Evaluated, idx: np.ndarray, pos: list[int]) -> np.ndarray:
    k, r = run.n_classes, idx.shape[0]
    flat = (run.positions[idx] + k * np.arange(r)[:, None]).ravel()
    counts = np.bincount(flat, minlength=r * k).reshape(r, k)[:, pos]
    hits = np.bincount(flat, weights=run.record["precision_hits"][idx].ravel().astype(float),
                       minlength=r * k).reshape(r, k)[:, pos]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.nanmean(np.where(counts > 0, hits / np.maximum(counts, 1), np.nan), 1)


def _statistic(metric: str, run: Evaluated, idx: np.ndarray, classes: list[str]) -> np.ndarray:
    """``metric`` of ``run`` on each resample (rows of ``idx``; the identity row gives the measured value)."""
    if metric in SHARE_METRICS:
        s = _shares(run, idx)
        if metric == "minority_share":
            mpos = run.class_pos([str(c) for c in run.summary.get("minority_classes", [])])
            return s[:, mpos].sum(1)
        if metric == "fd":
            return np.sqrt(((s - 1 / run.n_classes) ** 2).sum(1))
        tv = 0.5 * np.abs(s - 1 / run.n_classes).sum(1)
        return tv - tv_floor(idx.shape[1], run.n_classes) if metric == "tv_excess" else tv
    if metric == "precision":
        return run.record["precision_hits"][idx].mean(1)
    if metric in COPY_METRICS:
        group = np.isin(run.positions, run.class_pos([str(c) for c in run.summary["overfitting_classes"]]))
        flags = np.where(group, run.record[COPY_METRICS[metric]], np.nan)[idx]
        known = ~np.isnan(flags)  # a resample may hold no sample of the over-fitting classes: NaN, not a warning
        counts = known.sum(1)
        return np.divide(np.where(known, flags, 0.0).sum(1), counts, out=np.full(idx.shape[0], np.nan),
                         where=counts > 0)
    if metric == "precision_class_mean":
        return _class_mean_precision(run, idx, run.class_pos(classes))
    return run.record["recall_hits"][idx].mean(1)


def paired(a: Evaluated, b: Evaluated) -> bool:
    """Were the two runs sampled from the same initial noise, sample by sample?"""
    return (len(a.positions) == len(b.positions) and a.summary.get("sample_seed") is not None
            and a.summary.get("sample_seed") == b.summary.get("sample_seed"))


def difference(metric: str, a: Evaluated, b: Evaluated, classes: list[str], seed: int = 0) -> list[float] | None:
    """[a - b, lo, hi]: the difference of ``metric`` and its 95% interval (module doc); None when the records
    cannot give it."""
    if metric in FID_METRICS:
        key = {"fid": "fid_draws", "fid_data": "fid_data_draws", "fid_class_mean": "fid_class_draws"}[metric]
        if key not in a.record or key not in b.record:
            return None
        if metric == "fid_class_mean":
            if not classes:
                return None
            da, db = a.record[key][:, a.class_pos(classes)].mean(1), b.record[key][:, b.class_pos(classes)].mean(1)
            point = (np.mean([a.summary["fid_per_class"][c] for c in classes])
                     - np.mean([b.summary["fid_per_class"][c] for c in classes]))
        else:
            da, db, point = a.record[key], b.record[key], a.summary[metric] - b.summary[metric]
        n = min(len(da), len(db))
        return [float(point), *recentred_interval(da[:n] - db[:n], float(point))]
    if metric in COPY_METRICS and (COPY_METRICS[metric] not in a.record or COPY_METRICS[metric] not in b.record):
        return None
    if metric == "generalization_gap":
        return _gap_difference(a, b, seed)
    if metric == "recall":
        if "recall_hits" not in a.record or "recall_hits" not in b.record:
            return None
        na, nb = len(a.record["recall_hits"]), len(b.record["recall_hits"])
        ia = _indices(a, seed, na)
        ib = ia if na == nb else _indices(b, seed + 1, nb)  # the same reference images: paired
    else:
        ia = _indices(a, seed)
        ib = ia if paired(a, b) else _indices(b, seed + 1)
    whole_a, whole_b = np.arange(ia.shape[1])[None], np.arange(ib.shape[1])[None]
    point = float(_statistic(metric, a, whole_a, classes)[0] - _statistic(metric, b, whole_b, classes)[0])
    boot = _statistic(metric, a, ia, classes) - _statistic(metric, b, ib, classes)
    if metric in COPY_METRICS:  # a run without samples of the classes has no rate; a resample may draw none
        if not np.isfinite(point):
            return None
        boot = boot[np.isfinite(boot)]
    return [point, *percentile_interval(boot)]


def _gap_difference(a: Evaluated, b: Evaluated, seed: int) -> list[float] | None:
    """[a - b, lo, hi] of the generalization gap: a bootstrap over the image pairs, paired between the runs when
    they measured the same pairs (one split, one seed)."""
    da, db = a.record.get("gap_differences"), b.record.get("gap_differences")
    if da is None or db is None or len(da) < 2 or len(db) < 2:
        return None
    resamples = int(a.summary.get("intervals", {}).get("resamples") or 1000)
    rng = np.random.default_rng(seed)
    ia = rng.integers(0, len(da), (resamples, len(da)))
    same = len(da) == len(db) and a.summary.get("overfitting_seed") == b.summary.get("overfitting_seed")
    ib = ia if same else rng.integers(0, len(db), (resamples, len(db)))
    return [float(da.mean() - db.mean()), *percentile_interval(da[ia].mean(1) - db[ib].mean(1))]


def differences(point: Evaluated, references: dict[str, Evaluated], metrics: tuple[str, ...],
                classes: list[str]) -> dict[str, dict[str, list[float]]]:
    """{reference role: {metric: [d, lo, hi]}} for every reference but the point itself."""
    return {role: {m: d for m in metrics if (d := difference(m, point, ref, classes)) is not None}
            for role, ref in references.items() if ref is not point}

