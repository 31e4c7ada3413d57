"""What a job prints while it runs (docs/TRAINING.md and docs/TUNING.md: What you will see).

By default the console carries what a user decides from; ``--verbose`` brings Ray's own lines back:
- Ray Train's INFO lines (one per report, with the whole metrics dict and the checkpoint path; the controller's
  resource requests) and Tune's status tables stay in Ray's log files (``train_log_level``, ``tune_verbosity``);
  warnings and errors print in full;
- a training run shows one progress bar: primal step of the budget, ETA, the objective loss and lambda per
  constraint (``cdd_ray.progress.bar_text``; on a terminal Ray draws a worker's bar on the driver, in a log it
  is a line a minute: ``cdd_ray.progress.LineProgress``);
- a sweep shows a compact table of its trials, refreshed in place on a terminal and every two minutes (and when a
  trial starts or ends) in a log, with trials done / running / pending and the sweep's ETA
  (``cdd_ray.sweep.table.SweepTable``).
"""

from __future__ import annotations

QUIET_LEVEL = "WARNING"


def train_log_level(verbose: bool) -> str:
    """Ray Train's console log level (its log files under the Ray session keep every line either way)."""
    return "INFO" if verbose else QUIET_LEVEL


def tune_verbosity(verbose: bool) -> int | None:
    """Tune's own output: None (Ray's default: status tables, every trial's config) or silent (SweepTable)."""
    return None if verbose else 0


def quiet_libraries(verbose: bool) -> None:
    """Optuna's INFO lines ("A new study created") follow ``verbose`` (Ray's own: ``ray.init(logging_level=)``)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.INFO if verbose else optuna.logging.WARNING)


def dashboard_message(url: str, token_auth: bool) -> str:
    """The dashboard line, with how to sign in when the cluster asks for its token."""
    msg = f"Ray dashboard: {url}"
    if token_auth:
        msg += ("  (token authentication is on: sign in with the token that `ray get-auth-token` prints on "
                "the head node)")
    return msg
