"""The per-dual-step metrics: rank 0 of a Ray Train worker group buffers them and sends them in batches
(``MetricBuffer``), keeps what it could not send beside the run's outputs (``PENDING_FILE``) for the driver, and a
restarted group sends only dual steps MLflow does not have; their MLflow names (``lambda/...``, ``loss/...``)."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Iterable

from cdd_ray.tracking.client import TrackingError, client, with_retries

log = logging.getLogger(__name__)
PENDING_FILE = "mlflow_pending.jsonl"  # metric points a worker could not send, beside the run's outputs


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
