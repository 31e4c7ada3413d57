"""The MLflow store: its URI (``MLFLOW_TRACKING_URI``, else ``sqlite:///<cwd>/mlflow.db``), a client whose every
write goes through ``with_retries``, a fresh SQLite store opened under a machine-wide lock, the server's answer to
the credentials, the experiment, and where to look in the UI."""

from __future__ import annotations

import os
import random
import time
from pathlib import Path
from typing import Callable, TypeVar

from cdd_ray.config import ConfigError

T = TypeVar("T")

DEFAULT_EXPERIMENT = "cdd-ray"


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
