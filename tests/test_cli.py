"""cdd_ray.cli: what the jobs' flags become in the config, in which order they win, and how bad input ends a job
(exit 2, the message on stderr) before any work. The jobs themselves run as typed in tests/e2e/ and beside the
modules they exercise."""

import argparse
import json
import re

import pytest

from cdd_ray import cli
from cdd_ray.config import ConfigError, build_config


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    cli.add_config_flags(p)
    cli.add_baseline_flag(p)
    cli.add_ray_flags(p)
    cli.add_task_flags(p)
    cli.add_search_flags(p)
    p.add_argument("--smoke", action="store_true")
    return p


def test_flags_reach_their_config_fields_and_win_over_set_which_wins_over_the_file(tmp_path):
    (tmp_path / "run.yaml").write_text("dual: {eta: 0.3, kind: plain}\nray: {workers: 4}\noptim: {steps: 50}\n")
    args = parser().parse_args(["--preset", "smoke", "--config", str(tmp_path / "run.yaml"), "--set", "dual.eta=0.2",
                                "--set", "ray.workers=2", "--workers", "3", "--storage", "/srv/ray", "--name", "n1",
                                "--root", "/data", "--address", "127.0.0.1:6379"])
    cfg = cli.config_from_args(args)
    assert (cfg.model.preset, cfg.dual.kind, cfg.optim.steps) == ("smoke", "plain", 50)  # preset, then the file
    assert cfg.dual.eta == 0.2 and cfg.ray.workers == 3  # --set over the file, a flag over --set
    assert (cfg.ray.storage, cfg.name, cfg.data.root, cfg.ray.address) == ("/srv/ray", "n1", "/data", "127.0.0.1:6379")


def test_a_run_without_a_name_is_named_by_its_preset_kind_and_time():
    cfg = cli.config_from_args(parser().parse_args(["--preset", "smoke", "--unconstrained"]))
    assert re.fullmatch(r"smoke-baseline-\d{8}-\d{6}", cfg.name) and cfg.unconstrained


@pytest.mark.parametrize("argv, message", [
    (["--resume"], "error: --resume needs --name: the run to continue"),
    (["--set", "dual.kind=augmented"], "error: dual.kind: 'augmented' not allowed; allowed: plain, resilient"),
    (["--set", "optim.nope=1"], "optim.nope"),
])
def test_bad_input_exits_2_with_the_field_named(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        cli.config_from_args(parser().parse_args(["--preset", "smoke", *argv]))
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_a_baseline_must_be_a_finished_unconstrained_run_of_the_same_classes(tmp_path):
    cfg = build_config("smoke")
    shares = [0.1] * 10
    run = tmp_path / "base"
    run.mkdir()
    with pytest.raises(ConfigError, match="--baseline: .* is not a finished run's --out folder"):
        cli.with_baseline(cfg, str(run))
    (run / "summary.json").write_text(json.dumps({"class_shares": shares, "class_ids": list(range(10)),
                                                  "constrained": True}))
    with pytest.raises(ConfigError, match="is a constrained run; give an unconstrained one"):
        cli.with_baseline(cfg, str(run))
    (run / "summary.json").write_text(json.dumps({"class_shares": shares[:3], "class_ids": [0, 1, 2],
                                                  "constrained": False}))
    with pytest.raises(ConfigError, match=r"generated classes \[0, 1, 2\], this run's data.classes are \[0, 1, 2, 3"):
        cli.with_baseline(cfg, str(run))
    (run / "summary.json").write_text(json.dumps({"class_shares": shares, "class_ids": list(range(10)),
                                                  "constrained": False}))
    assert cli.with_baseline(cfg, str(run)).eval.baseline_shares == shares


def test_the_time_budget_is_45_minutes_on_cpu_unless_given_or_a_smoke_sweep():
    p = parser()
    assert cli.time_budget(p.parse_args([]), on_cpu=True) == 45 * 60
    assert cli.time_budget(p.parse_args([]), on_cpu=False) is None  # GPUs: the sweep's own length
    assert cli.time_budget(p.parse_args(["--smoke"]), on_cpu=True) is None
    assert cli.time_budget(p.parse_args(["--time-budget", "1h30m"]), on_cpu=False) == 5400
    with pytest.raises(ConfigError, match="--time-budget"):
        cli.time_budget(p.parse_args(["--time-budget", "soon"]), on_cpu=True)
