"""One MLflow run's life on the driver: created (params, tags, its parent), tagged, its metrics and artifacts
logged, ended with its status (FINISHED, FAILED or KILLED: never left RUNNING)."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from cdd_ray.config import Config, flatten
from cdd_ray.tracking.client import DEFAULT_EXPERIMENT, check_reachable, client, get_or_create_experiment, with_retries

SECRET_HINTS = ("token", "secret", "password", "key", "credential", "auth")


def safe_params(cfg: Config) -> dict[str, str]:
    """The resolved config, flattened; never environment variables or anything that looks like a secret."""
    out = {}
    for k, v in flatten(cfg.to_dict()).items():
        if any(h in k.lower() for h in SECRET_HINTS):
            continue
        out[k] = str(v)[:6000]
    return out


def git_commit() -> str | None:
    try:
        root = Path(__file__).resolve().parents[2]
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=5, check=True).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def start_run(cfg: Config, uri: str, experiment: str = DEFAULT_EXPERIMENT, parent_run_id: str | None = None,
              extra_tags: dict[str, str] | None = None) -> str:
    """Create the MLflow run of a training run with params and tags; returns its id."""
    from mlflow.entities import Param, RunTag

    check_reachable(uri)
    exp_id = get_or_create_experiment(uri, experiment)
    tags = {
        "preset": cfg.model.preset, "constrained": str(not cfg.unconstrained).lower(), "job_name": cfg.name,
        "dual_kind": cfg.dual.kind if not cfg.unconstrained else "none",
        "mlflow.runName": cfg.name,
    }
    commit = git_commit()
    if commit:
        tags["git_commit"] = commit
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    tags.update(extra_tags or {})
    run_id = create_run(uri, exp_id, cfg.name, tags)
    c = client(uri)
    params = [Param(k, v) for k, v in safe_params(cfg).items()]
    for i in range(0, len(params), 100):
        chunk = params[i:i + 100]
        with_retries(lambda: c.log_batch(run_id, params=chunk), "log params", uri)
    with_retries(lambda: c.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()]), "log tags", uri)
    return run_id


def create_run(uri: str, experiment_id: str, name: str, tags: dict[str, str]) -> str:
    """A run with a name and tags (a training run's params are start_run's; a registration has none)."""
    c = client(uri)
    run = with_retries(lambda: c.create_run(experiment_id, tags=tags, run_name=name), "create run", uri)
    return run.info.run_id


def set_tags(uri: str, run_id: str, tags: dict[str, str]) -> None:
    from mlflow.entities import RunTag

    c = client(uri)
    with_retries(lambda: c.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()]), "set tags", uri)


def log_metrics(uri: str, run_id: str, metrics: dict[str, float], step: int) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
    c = client(uri)
    for i in range(0, len(batch), 500):
        chunk = batch[i:i + 500]
        with_retries(lambda: c.log_batch(run_id, metrics=chunk), "log metrics", uri)


def log_artifacts(uri: str, run_id: str, local_dir: str | Path, artifact_path: str | None = None) -> None:
    c = client(uri)
    with_retries(lambda: c.log_artifacts(run_id, str(local_dir), artifact_path), f"log artifacts {local_dir}", uri)


def end_run(uri: str, run_id: str, status: str, budget_s: float | None = None, if_running: bool = False) -> None:
    """Mark the run FINISHED, FAILED or KILLED. ``if_running``: only a run still RUNNING, so that a status someone
    else set first stays (a sweep marks a trial ASHA stopped FINISHED, maybe before the trial's process ends)."""
    c = client(uri)
    if if_running and with_retries(lambda: c.get_run(run_id).info.status, "read status", uri, budget_s) != "RUNNING":
        return
    with_retries(lambda: c.set_terminated(run_id, status), f"set status {status}", uri, budget_s)
