"""cdd_ray.register: the choice rules and the input errors (the registration of a real sweep's trial, its pyfunc
model and sampling from it: tests/test_tune.py::test_register_*, on the suite's smoke sweep)."""

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
