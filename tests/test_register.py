"""cdd_ray.register: the choice rules and the input errors (the registration of a real sweep's trial, its pyfunc
model and sampling from it: tests/sweep/test_sweep.py::test_register_*, on the suite's smoke sweep)."""

import pytest

from cdd_ray.config import ConfigError
from cdd_ray.register import choose, register
from cdd_ray.register import main as register_main


def test_each_rule_picks_its_trial():
    rows = [{"trial_id": "sharp", "precision": 0.95, "tv_to_uniform": 0.30},
            {"trial_id": "fair", "precision": 0.70, "tv_to_uniform": 0.05},
            {"trial_id": "fair-too", "precision": 0.80, "tv_to_uniform": 0.05},
            {"trial_id": "middle", "precision": 0.90, "tv_to_uniform": 0.12}]
    obj = ("precision", "tv_to_uniform")
    assert choose(rows, obj, "quality", None)["trial_id"] == "sharp"
    assert choose(rows, obj, "fairness", None)["trial_id"] == "fair-too"  # tie on tv: the better precision
    assert choose(rows, obj, None, 0.15)["trial_id"] == "middle"
    assert choose(rows, obj, None, 0.05)["trial_id"] == "fair-too"
    # a minimised quality objective (fid): lower is better
    fid_rows = [{"trial_id": "a", "fid": 10.0, "tv_to_uniform": 0.2}, {"trial_id": "b", "fid": 5.0, "tv_to_uniform": 0.3}]
    assert choose(fid_rows, ("fid", "tv_to_uniform"), "quality", None)["trial_id"] == "b"
    with pytest.raises(ConfigError, match=r"no trial has tv_to_uniform <= 0.01; closest: fair \(tv_to_uniform 0.050\)"):
        choose(rows, obj, None, 0.01)
    with pytest.raises(ConfigError, match="no finished, evaluated trial"):
        choose([], obj, "quality", None)


def test_rules_and_names_are_checked_before_anything_is_registered(tmp_path):
    uri = f"sqlite:///{tmp_path / 'empty.db'}"
    with pytest.raises(ConfigError, match=r"--sweep: no finished sweep named 'nope' in .*empty.db'; finished sweeps "
                                          r"there: none"):
        register("nope", pick="quality", uri=uri)
    with pytest.raises(ConfigError, match=r"--max-tv: 1.5 must be in \(0, 1\)"):
        register("nope", max_fairness=1.5, uri=uri)
    with pytest.raises(ConfigError, match="give one rule"):
        register("nope", uri=uri)
    with pytest.raises(ConfigError, match="give one rule"):
        register("nope", pick="quality", max_fairness=0.1, uri=uri)
    with pytest.raises(SystemExit) as e:
        register_main(["--sweep", "nope", "--pick", "speed"])  # argparse lists the choices
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        register_main(["--sweep", "nope", "--pick", "quality", "--tracking-uri", uri])
    assert e.value.code == 2


def test_trials_logged_before_the_grouped_metric_names_are_still_read(tmp_path):
    """A sweep's trials are read by their eval/<metric> names, and a run logged before those names by its flat
    ones (precision, precision_ci_lo, ...); a trial without its objectives is left out."""
    from cdd_ray import tracking
    from cdd_ray.config import build_config
    from cdd_ray.register import find_sweep, trial_rows

    uri = f"sqlite:///{tmp_path / 'mixed.db'}"
    cfg = build_config("smoke", overrides={"name": "mixed"})
    parent = tracking.start_run(cfg, uri, extra_tags={"role": "sweep", "sweep": "mixed"})
    tracking.set_tags(uri, parent, {"objectives": "precision,tv_to_uniform"})
    logged = {"old": {"precision": 0.8, "precision_ci_lo": 0.7, "precision_ci_hi": 0.9, "tv_to_uniform": 0.2},
              "new": {"eval/precision": 0.6, "eval/precision_ci_lo": 0.5, "eval/precision_ci_hi": 0.65,
                      "eval/tv_to_uniform": 0.1},
              "unevaluated": {"loss/objective": 0.3}}
    for name, metrics in logged.items():
        run = tracking.start_run(cfg, uri, parent_run_id=parent, extra_tags={"role": "trial", "ray_trial_id": name})
        tracking.log_metrics(uri, run, metrics, 4)
        tracking.end_run(uri, run, "FINISHED")
    tracking.end_run(uri, parent, "FINISHED")
    client = tracking.client(uri)
    rows = {r["trial_id"]: r for r in trial_rows(client, find_sweep(client, "mixed"))}
    assert set(rows) == {"old", "new"}
    assert (rows["old"]["precision"], rows["old"]["precision_ci"], rows["old"]["tv_to_uniform"]) == (0.8, [0.7, 0.9], 0.2)
    assert (rows["new"]["precision"], rows["new"]["precision_ci"], rows["new"]["tv_to_uniform"]) == (0.6, [0.5, 0.65], 0.1)
