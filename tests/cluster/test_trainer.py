"""cdd_ray.cluster.trainer: which failed fits are fitted again (a worker group that died while it launched, up to
ray.max_failures) and which end the run, with fake trainers (no Ray started). Real runs on Ray Train:
tests/test_ray_train.py."""

import pytest
from ray.exceptions import ActorDiedError
from ray.train import ControllerError, WorkerGroupError

from cdd_ray.cluster import trainer


class Fits:
    """Trainers whose fits fail with the given errors, then succeed; each fit is counted."""

    def __init__(self, *errors):
        self.errors, self.fits = list(errors), 0

    def build(self):
        return self

    def fit(self):
        self.fits += 1
        if self.errors:
            raise self.errors.pop(0)
        return type("Result", (), {"error": None, "checkpoint": "final"})()


def test_a_run_whose_worker_dies_at_launch_is_fitted_again_up_to_max_failures(monkeypatch):
    released = []
    monkeypatch.setattr(trainer, "release_group_of", released.append)
    died = [ControllerError(ActorDiedError()) for _ in range(3)]
    fits = Fits(*died[:2])
    assert trainer.fit_run(fits.build, max_failures=2) == "final" and fits.fits == 3
    assert released == [e.controller_failure for e in died[:2]]  # each dead worker's group removed before a refit
    fits = Fits(*died)
    with pytest.raises(ControllerError):  # no restarts left: the error, the dead worker's group still released
        trainer.fit_run(fits.build, max_failures=2)
    assert fits.fits == 3 and len(released) == 5
    fits = Fits(*died)
    assert trainer.fit_run(fits.build, max_failures=-1) == "final" and fits.fits == 4  # -1: no limit
    other = [ControllerError(RuntimeError("a bug in a callback")), WorkerGroupError("rank 0 raised", {})]
    for error in other:  # anything else is not fitted again (Ray Train retried worker errors itself)
        fits = Fits(error)
        with pytest.raises(type(error)):
            trainer.fit_run(fits.build, max_failures=2)
        assert fits.fits == 1


