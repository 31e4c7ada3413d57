"""MLflow tracking: one run per training run, written by few writers with retries. ``client`` the store and
its retries, ``runs`` a run's life on the driver, ``buffer`` the per-dual-step metrics of the workers.

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

from cdd_ray.tracking.buffer import (PENDING_FILE, STEP_GROUPS, dual_step_metrics, last_logged_primal_step,
                                     log_pending, metric, MetricBuffer, step_metric_name)
from cdd_ray.tracking.client import (DEFAULT_EXPERIMENT, EXPERIMENT_KIND, NOT_TRANSIENT, artifact_root,
                                     check_reachable, check_server, client, get_or_create_experiment, retry_budget_s,
                                     tracking_uri, TrackingError, ui_hint, with_retries)
from cdd_ray.tracking.runs import (SECRET_HINTS, create_run, end_run, git_commit, log_artifacts, log_metrics,
                                   safe_params, set_tags, start_run)

__all__ = ["artifact_root", "check_reachable", "check_server", "client", "create_run", "DEFAULT_EXPERIMENT",
           "dual_step_metrics", "end_run", "EXPERIMENT_KIND", "get_or_create_experiment", "git_commit",
           "last_logged_primal_step", "log_artifacts", "log_metrics", "log_pending", "metric", "MetricBuffer",
           "NOT_TRANSIENT", "PENDING_FILE", "retry_budget_s", "safe_params", "SECRET_HINTS", "set_tags", "start_run",
           "STEP_GROUPS", "step_metric_name", "tracking_uri", "TrackingError", "ui_hint", "with_retries"]
