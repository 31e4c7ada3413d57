"""MLflow tracking: one run per training run, written by few writers with retries.

Design (safe for many concurrent Ray trials on one SQLite file or a team server):
- the driver creates the run, logs params and tags, and at the end logs the evaluation metrics, the
  artifacts and the final status (FINISHED, FAILED or KILLED: never left RUNNING);
- rank 0 of the Ray Train worker group logs the per-dual-step metrics, buffered and sent in
  batches (``MetricBuffer``); other ranks never write;
- every write goes through ``with_retries``: "database is locked" and connection errors are retried
  with backoff, and a store that stays away raises ``TrackingError`` naming the URI.

Tracking URI: ``MLFLOW_TRACKING_URI`` when set; otherwise ``sqlite:///<cwd>/mlflow.db`` with
artifacts in ``<cwd>/mlartifacts``. Open the UI with
``mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1``.
"""

from __future__ import annotations

import json
import logging
import os
import random
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, Iterable, TypeVar

from cdd_ray.config import Config, ConfigError, flatten

log = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_EXPERIMENT = "cdd-ray"
PENDING_FILE = "mlflow_pending.jsonl"  # metric points a worker could not send, beside the run's outputs
SECRET_HINTS = ("token", "secret", "password", "key", "credential", "auth")


class TrackingError(RuntimeError):
    """The MLflow store cannot be reached or written; the message names the URI."""


def tracking_uri(cwd: str | Path | None = None) -> str:
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    if uri:
        return uri
    return f"sqlite:///{Path(cwd or os.getcwd()).resolve() / 'mlflow.db'}"


def artifact_root(uri: str, cwd: str | Path | None = None) -> str | None:
    """Local artifact folder beside a local SQLite store; None lets a server choose."""
    if uri.startswith("sqlite:///"):
        return (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").resolve().as_uri()
    return None


def retry_budget_s() -> float:
    """Seconds a write keeps retrying a store that is away: ``CDD_RAY_MLFLOW_RETRY_S`` (default 120)."""
    return float(os.environ.get("CDD_RAY_MLFLOW_RETRY_S", "120"))


# MLflow error codes a retry cannot change: a missing run, a bad request, credentials the server refuses.
NOT_TRANSIENT = ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "INVALID_PARAMETER", "UNAUTHENTICATED",
                 "PERMISSION_DENIED")


def check_server(uri: str) -> None:
    """A tracking server answers this job's credentials (MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD or
    MLFLOW_TRACKING_TOKEN): a refusal is a ``ConfigError`` naming the server, before any run or training starts.
    A server that does not answer is left to the first write (retried, then ``TrackingError``)."""
    from mlflow.exceptions import MlflowException

    try:
        client(uri).search_experiments(max_results=1)
    except MlflowException as e:
        code = str(getattr(e, "error_code", ""))
        if code not in ("UNAUTHENTICATED", "PERMISSION_DENIED"):
            return
        given = [k for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")
                 if os.environ.get(k)]
        raise ConfigError(f"MLFLOW_TRACKING_URI: the tracking server {uri!r} refused the credentials ({code}; "
                          + (f"given: {', '.join(given)}" if given else "none given") + "); set "
                          "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD to a user of that server") from None


def with_retries(fn: Callable[[], T], what: str, uri: str, budget_s: float | None = None, base_s: float = 0.2) -> T:
    """Call ``fn``; retry transient store errors (SQLite locks, refused or timed-out connections) with jittered
    backoff for at most ``budget_s`` seconds (default ``retry_budget_s()``), then raise ``TrackingError``.

    Retrying is safe: every metric point keeps its own timestamp, so a batch the server received before a
    time-out is stored once.
    """
    from mlflow.exceptions import MlflowException

    budget = retry_budget_s() if budget_s is None else budget_s
    t0 = time.monotonic()
    last: Exception | None = None
    for i in range(10_000):
        try:
            return fn()
        except MlflowException as e:
            if str(getattr(e, "error_code", "")) in NOT_TRANSIENT:
                raise
            last = e
        except (OSError, ConnectionError) as e:
            last = e
        except Exception as e:  # noqa: BLE001 - sqlalchemy OperationalError ("database is locked") and kin
            if "locked" not in str(e) and "connect" not in str(e).lower():
                raise
            last = e
        pause = min(8.0, base_s * (2 ** i)) * (0.5 + random.random())
        if time.monotonic() - t0 + pause > budget:
            break
        time.sleep(pause)
    raise TrackingError(f"MLflow store {uri!r}: {what} failed for {time.monotonic() - t0:.0f} s "
                        f"({i + 1} attempts): {str(last)[:300]}") from last


def client(uri: str | None = None):
    from mlflow import MlflowClient

    # with_retries does the retrying: one MLflow HTTP request must neither retry for minutes on its own
    # (MLflow's default: 7 retries with backoff) nor wait 120 s on a server that accepts but never answers.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    uri = uri or tracking_uri()
    _create_sqlite_store_once(uri)
    return MlflowClient(tracking_uri=uri)


_OPENED: set[str] = set()


def _create_sqlite_store_once(uri: str) -> None:
    """Open a SQLite store the first time in this process under a lock shared by every process on the machine.

    MLflow creates a new SQLite store's tables and runs its migrations without a lock, so two jobs that open
    one fresh ``mlflow.db`` at once break each other's migrations ("table _alembic_tmp_tags already exists",
    "Online migration expected to match one row"). Under the lock the first opener creates the tables; the
    others find them.
    """
    if not uri.startswith("sqlite:///") or uri in _OPENED:
        return
    import fcntl
    import hashlib
    import tempfile

    from mlflow import MlflowClient

    key = hashlib.sha256(str(Path(uri.removeprefix("sqlite:///")).resolve()).encode()).hexdigest()[:16]
    with open(Path(tempfile.gettempdir()) / f"cdd-ray-sqlite-{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            MlflowClient(tracking_uri=uri).search_experiments(max_results=1)  # creates the tables if none
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    _OPENED.add(uri)


def check_reachable(uri: str, timeout_s: float = 5.0) -> None:
    """Fail fast (before any training) when a remote tracking server does not answer."""
    if not uri.startswith(("http://", "https://")):
        return
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s)
    except (urllib.error.URLError, OSError) as e:
        raise TrackingError(f"MLflow tracking server {uri!r} is unreachable: {e}") from None


# MLflow 3 records an experiment's kind in this tag ("custom_model_development" is the UI's "Model training").
# It does not decide the page MLflow 3.17's UI opens on (the browser's workflow switch does: see ui_hint).
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


def get_or_create_experiment(uri: str, name: str = DEFAULT_EXPERIMENT) -> str:
    """The experiment's id, created if needed, marked as model training unless it already has a kind."""
    c = client(uri)

    def go() -> str:
        exp = c.get_experiment_by_name(name)
        if exp is None:
            try:
                c.create_experiment(name, artifact_location=artifact_root(uri), tags=EXPERIMENT_KIND)
            except Exception:  # noqa: BLE001 - another process created it first, or the store failed (retried)
                if c.get_experiment_by_name(name) is None:
                    raise
            exp = c.get_experiment_by_name(name)
        for k, v in EXPERIMENT_KIND.items():
            if k not in exp.tags:  # a kind the user chose stays
                c.set_experiment_tag(exp.experiment_id, k, v)
        return exp.experiment_id

    return with_retries(go, f"get or create experiment {name!r}", uri)


def ui_hint(uri: str, run_id: str | None = None, experiment: str = DEFAULT_EXPERIMENT) -> str:
    """Where to look in the MLflow UI: the experiment's (or a run's) page, opened as model training.

    MLflow 3.17's UI opens an experiment on its GenAI overview until the browser's workflow switch says "Model
    training" or the address carries ``?workflowType=machine_learning`` (the experiment's kind tag does not
    decide it). A local SQLite store: the ``mlflow ui`` command to start and the address it serves."""
    c = client(uri)
    exp = with_retries(lambda: c.get_experiment_by_name(experiment), f"find experiment {experiment!r}", uri) \
        if uri.startswith(("sqlite:///", "http://", "https://")) else None
    if exp is None:
        return f"MLflow store: {uri}"
    exp_id = exp.experiment_id
    page = f"#/experiments/{exp_id}" + (f"/runs/{run_id}" if run_id else "") + "?workflowType=machine_learning"
    if uri.startswith("sqlite:///"):
        return (f"MLflow store: {uri}; open the UI: mlflow ui --backend-store-uri {uri} --host 127.0.0.1, then "
                f"http://127.0.0.1:5000/{page}")
    return f"MLflow: {uri.rstrip('/')}/{page}"


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
        root = Path(__file__).resolve().parents[1]
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


def end_run(uri: str, run_id: str, status: str, budget_s: float | None = None) -> None:
    """Mark the run FINISHED, FAILED or KILLED."""
    c = client(uri)
    with_retries(lambda: c.set_terminated(run_id, status), f"set status {status}", uri, budget_s)


class MetricBuffer:
    """Per-dual-step metrics of rank 0, sent in batches when a checkpoint is written, at every report window (a
    sweep's trial: ASHA may stop it there) and at the end.

    A restarted worker group continues from its checkpoint and adds only the dual steps after the newest one
    MLflow has (``last_logged_primal_step``): every dual step is logged once.
    A store that is away is retried briefly (``soft_budget_s``) and the points stay buffered (bounded):
    training goes on, tracking never stops or corrupts it. What is still unsent at the end is written
    beside the run's outputs (``save_pending``) and sent by the driver with the final metrics.
    """

    def __init__(self, uri: str, run_id: str, max_buffer: int = 200_000, soft_budget_s: float = 5.0):
        self.uri, self.run_id, self.max_buffer, self.soft_budget_s = uri, run_id, max_buffer, soft_budget_s
        self.pending: list[Any] = []
        self.dropped = 0

    def add(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.pending.extend(Metric(k, float(v), now, int(step)) for k, v in metrics.items())
        if len(self.pending) > self.max_buffer:
            self.dropped += len(self.pending) - self.max_buffer
            self.pending = self.pending[-self.max_buffer:]

    def flush(self, raise_errors: bool = True) -> bool:
        """Send what is pending; True when nothing is left. ``raise_errors=False``: give up after
        ``soft_budget_s`` and keep the rest for later."""
        c = client(self.uri)
        while self.pending:
            chunk = self.pending[:500]
            try:
                with_retries(lambda: c.log_batch(self.run_id, metrics=chunk), "log metrics", self.uri,
                             budget_s=None if raise_errors else self.soft_budget_s)
            except TrackingError:
                if raise_errors:
                    raise
                log.warning("MLflow store %s unavailable; %d metric points kept in memory", self.uri, len(self.pending))
                return False
            del self.pending[:len(chunk)]
        return True

    def save_pending(self, path: str | Path) -> None:
        """Write the unsent points as JSON lines (for ``log_pending``); nothing when all were sent."""
        if self.pending:
            with open(path, "w") as f:
                for m in self.pending:
                    f.write(json.dumps([m.key, m.value, m.timestamp, m.step]) + "\n")


def last_logged_primal_step(uri: str, run_id: str) -> int:
    """The primal step of the newest dual step the run has in MLflow (0: none, or the store is away). A restarted
    worker group logs only the dual steps after it: points are sent at checkpoints and at every report window, so
    some may be newer than the checkpoint it restarts from."""
    try:
        metrics = with_retries(lambda: client(uri).get_run(run_id).data.metrics, "read the run's metrics", uri,
                               budget_s=5.0)
    except TrackingError:
        return 0
    return int(metrics.get(step_metric_name("primal_step"), 0))


def log_pending(uri: str, run_id: str, path: str | Path) -> int:
    """Send the points a worker could not (``MetricBuffer.save_pending``); returns how many."""
    from mlflow.entities import Metric

    path = Path(path)
    if not path.exists():
        return 0
    points = [Metric(*json.loads(line)) for line in path.read_text().splitlines() if line.strip()]
    c = client(uri)
    for i in range(0, len(points), 500):
        chunk = points[i:i + 500]
        with_retries(lambda: c.log_batch(run_id, metrics=chunk), "log buffered metrics", uri)
    return len(points)


# MLflow's chart view groups metrics by the part of their name before "/": the loop's flat names (what Ray Tune
# and the loop's history use) are logged as lambda/<constraint>, loss/<dataset>, slack/<constraint>, train/lr.
# Runs logged before this naming keep their flat names; readers take either (``metric``).
STEP_GROUPS = (("lambda_", "lambda/"), ("slack_", "slack/"), ("loss_", "loss/"))


def step_metric_name(key: str) -> str:
    """A per-dual-step metric's MLflow name: ``lambda_class_4`` -> ``lambda/class_4``, ``lr`` -> ``train/lr``."""
    for flat, group in STEP_GROUPS:
        if key.startswith(flat):
            return group + key[len(flat):]
    return "train/" + key


def dual_step_metrics(history: Iterable[dict[str, float]]) -> Iterable[tuple[dict[str, float], int]]:
    """(metrics, step) pairs for MLflow from the loop's per-block history; step = dual-step index."""
    for m in history:
        step = int(m["dual_step"]) if m.get("dual_step") else int(m["step"])
        flat = {k: v for k, v in m.items() if k not in ("step", "dual_step")} | {"primal_step": m["step"]}
        yield {step_metric_name(k): v for k, v in flat.items()}, step


def metric(metrics: dict[str, float], name: str, group: str = "eval") -> float | None:
    """A final metric of a run by its flat name (``precision``): ``eval/precision``, or the flat name a run logged
    before the grouped names."""
    return metrics.get(f"{group}/{name}", metrics.get(name))
