"""The sweep's runs besides its trials: the references, unconstrained fits (the baseline, the baseline continued for the
trials' budget, the rebalanced baseline), and any other child run on Ray Train (``run_child``: the confirmations),
reused when a sweep resumes; and the baseline's live per-class losses that relative thresholds (``dual.b_rel``) are
taken from."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from cdd_ray import storage as storage_io, tracking
from cdd_ray.cluster.trainer import make_trainer, worker_resources
from cdd_ray.config import Config, ConfigError, apply_overrides, config_from_dict, validate
from cdd_ray.runner import fit_tracked


def run_unconstrained(base: Config, storage: str, out: Path, uri: str, parent_run_id: str, role: str,
                      steps: int, init_from: str = "", overrides: dict[str, Any] | None = None,
                      store: str | None = None, verbose: bool = False) -> dict[str, Any]:
    """An unconstrained reference run (a child of the sweep, MLflow tag ``role``), its outputs in ``out`` and, when
    ``store`` (a folder of the run storage) is another place, there too; reused from ``store`` when the sweep is
    resumed. ``overrides``: config keys for this run only (e.g. ``optim.balanced`` for the rebalanced one)."""
    return run_child(lambda: reference_config(base, role, steps, init_from, overrides), storage, out, uri,
                     parent_run_id, {"sweep": base.name, "role": role}, store, verbose)


def run_child(make_config: Callable[[], Config], storage: str, out: Path, uri: str, parent_run_id: str,
              tags: dict[str, str], store: str | None = None, verbose: bool = False) -> dict[str, Any]:
    """One run of the sweep besides its trials (a reference, a confirmation) on Ray Train, a child of the sweep's
    MLflow run with ``tags`` (``role`` among them); its summary (``run_id``, ``role`` added) in ``out`` and, when
    ``store`` (a folder of the run storage) is another place, there too. Reused from ``store`` when the sweep is
    resumed: its summary.json, written last, says the run is complete (``make_config`` is then not called)."""
    store = store or str(out)
    role = tags["role"]
    saved = storage_io.read_text(storage_io.join(store, "summary.json"))
    if saved and json.loads(saved).get("role") == role:  # written last: the run is complete
        return json.loads(saved)
    cfg = make_config()
    resources = worker_resources(cfg)
    run_id = tracking.start_run(cfg, uri, parent_run_id=parent_run_id, extra_tags=tags)
    summary = fit_tracked(lambda: make_trainer(cfg, storage, cfg.name, resources, verbose=verbose,
                                               mlflow={"uri": uri, "run_id": run_id}), cfg.ray.max_failures,
                          uri, run_id, out)
    summary.update(run_id=run_id, role=role)
    if store != str(out):  # a URI storage: the outputs go there too, the driver keeps its copy
        storage_io.upload(out, store)
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
    storage_io.write_text(storage_io.join(store, "summary.json"), json.dumps(summary, indent=2))  # last: complete
    return summary


def reference_config(base: Config, role: str, steps: int, init_from: str = "",
                     overrides: dict[str, Any] | None = None) -> Config:
    """The config of the reference run ``role``: ``base`` unconstrained, ``steps`` steps, from ``init_from``'s weights
    (a warm start's shorter warm-up) or new ones, with ``overrides``."""
    cfg = config_from_dict(base.to_dict())
    cfg.unconstrained = True
    cfg.name = f"{base.name}-{role}"
    cfg.optim.steps = steps
    cfg.optim.init_from = init_from
    if init_from:
        cfg.optim.warmup = min(cfg.optim.warmup, steps // 10)
    apply_overrides(cfg, overrides or {})
    validate(cfg)
    return cfg


def live_class_losses(history_file: str | Path, names: list[str], fraction: float = 0.1) -> dict[str, float]:
    """Per-constraint training loss of the *live* model: the mean of ``loss_<name>`` over the last ``fraction``
    of the run's blocks (an unconstrained run records them with ``optim.monitor_constraints``). ``history_file``:
    a local path or one in the run storage."""
    history = json.loads(storage_io.read_text(str(history_file)) or "null")
    if history is None:
        raise ConfigError(f"dual.b_rel: no baseline history at {str(history_file)!r}")
    tail = history[-max(1, int(len(history) * fraction)):]
    missing = [n for n in names if f"loss_{n}" not in tail[-1]]
    if missing:
        raise ConfigError(f"dual.b_rel: the baseline's history {str(history_file)!r} has no live losses for "
                          f"{missing} (it must run with optim.monitor_constraints=true)")
    return {n: sum(h[f"loss_{n}"] for h in tail) / len(tail) for n in names}
