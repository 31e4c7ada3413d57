"""The console: the sweep's table (a Tune callback fed as Tune feeds it), the dashboard line, the training bar."""

import io
from dataclasses import dataclass, field

from cdd_ray.console import dashboard_message
from cdd_ray.sweep.table import SweepTable
from cdd_ray.progress import bar_text


@dataclass
class FakeTrial:  # what SweepTable reads of Tune's Trial
    trial_id: str
    config: dict = field(default_factory=dict)
    status: str = "RUNNING"
    last_result: dict = field(default_factory=dict)


class Clock:
    def __init__(self):
        self.t = 1_000_000.0

    def __call__(self):
        return self.t


def table(out, clock, tty=False):
    t = SweepTable(["dual.kind", "dual.gamma", "dual.eta"], budget=100, num_samples=4, concurrency=2,
                   objectives=("precision", "tv_to_uniform"), out=out, tty=tty, clock=clock)
    t.setup(total_num_samples=4)
    return t


def test_sweep_table_follows_the_trials_and_estimates_the_end():
    out, clock = io.StringIO(), Clock()
    t = table(out, clock)
    a = FakeTrial("a", {"dual.kind": "resilient", "dual.gamma": 0.2123, "dual.eta": 0.12})
    b = FakeTrial("b", {"dual.kind": "plain", "dual.gamma": 0.05, "dual.eta": 0.5, "optim.steps": 200})
    t.on_trial_start(0, [a], a)
    t.on_trial_start(0, [a, b], b)
    assert t.eta_s() is None and "ETA: measuring" in t.render()[-1]
    clock.t += 50
    t.on_trial_result(1, [a, b], a, {"step": 50, "asha_loss": 0.3})  # a window report: no loss_mean, no lambda
    t.on_trial_result(1, [a, b], a, {"step": 50, "loss_mean": 0.25, "lambda_class_4": 0.1, "lambda_class_5": 0.4})
    t.on_trial_result(1, [a, b], b, {"step": 50, "loss_mean": 0.5, "lambda_class_4": 0.0})
    lines = t.render()
    assert lines[0].split() == ["trial", "id", "status", "dual", "gamma", "eta", "step", "loss_mean", "max", "λ",
                                "precision", "tv_to_uniform"]
    assert lines[1].split() == ["t01", "a", "running", "resilient", "0.212", "0.12", "50/100", "0.25", "0.4", "-", "-"]
    assert lines[2].split()[:7] == ["t02", "b", "running", "plain", "0.05", "0.5", "50/200"]
    # 100 s for 100 steps: 1 s a step; left: 50 + 150 steps of the running trials, 2 pending x 100; 2 at once
    assert t.eta_s() == 200.0
    assert "trials: 0 finished, 2 running, 2 pending; 1 min so far; ETA " in lines[-1] and "(in 3 min)" in lines[-1]
    clock.t += 50
    a.last_result = {"step": 100, "precision": 0.91, "tv_to_uniform": 0.08, "loss_mean": 0.2}
    t.on_trial_complete(2, [a, b], a)
    b.last_result = {"step": 100}  # ASHA stopped it at its rung: no evaluation
    t.on_trial_complete(2, [a, b], b)
    c = FakeTrial("c", {"dual.kind": "plain"})
    t.on_trial_start(3, [a, b, c], c)
    t.on_trial_error(3, [a, b, c], c)
    rows = {r.split()[0]: r.split() for r in t.render()[1:-1]}
    assert rows["t01"][2] == "done" and rows["t01"][-2:] == ["0.91", "0.08"]
    assert rows["t02"][2] == "stopped" and rows["t03"][2] == "error"
    assert "3 finished, 0 running, 1 pending" in t.render()[-1]


def test_a_log_gets_the_table_on_changes_and_every_two_minutes_a_terminal_in_place():
    out, clock = io.StringIO(), Clock()
    t = table(out, clock)
    t.on_step_end(0, [])
    assert out.getvalue() == ""  # no trial yet
    a = FakeTrial("a", {"dual.kind": "plain"})
    t.on_trial_start(0, [a], a)
    t.on_step_end(0, [a])
    assert out.getvalue().count("trials: 0 finished, 1 running") == 1
    clock.t += 30
    t.on_trial_result(1, [a], a, {"step": 10})
    t.on_step_end(1, [a])
    assert out.getvalue().count("trials:") == 1  # a result is no change of state: the log waits
    clock.t += 100
    t.on_step_end(1, [a])
    assert out.getvalue().count("trials:") == 2
    t.on_experiment_end([a])
    assert out.getvalue().count("trials:") == 2  # nothing changed since: the log has the last table
    t.on_trial_complete(2, [a], a)
    t.on_experiment_end([a])
    assert out.getvalue().count("trials:") == 3 and "1 finished, 0 running" in out.getvalue().splitlines()[-1]

    tty, clock = io.StringIO(), Clock()
    t = table(tty, clock, tty=True)
    t.on_trial_start(0, [a], a)
    t.on_step_end(0, [a])
    clock.t += 3
    t.on_step_end(0, [a])
    first, second = tty.getvalue().split("\x1b[")[0], tty.getvalue().split("\x1b[", 1)[1]
    assert first.count("\n") == 3 and second.startswith("3F")  # back up over the 3 lines drawn, then redraw


def test_a_restored_sweep_shows_the_trials_that_had_ended():
    out, clock = io.StringIO(), Clock()
    t = table(out, clock)
    old = FakeTrial("a", {"dual.kind": "plain"}, status="TERMINATED",
                    last_result={"step": 100, "precision": 0.9, "tv_to_uniform": 0.1})
    new = FakeTrial("b", {"dual.kind": "plain"})
    t.on_trial_start(0, [old, new], new)
    t.on_step_end(0, [old, new])
    rows = {r.split()[0]: r.split() for r in t.render()[1:-1]}
    # numbered by their place in Tune's list of trials, as before the interruption
    assert rows["t01"][1:3] == ["a", "done"] and rows["t02"][1:3] == ["b", "running"]
    assert "1 finished, 1 running, 2 pending" in t.render()[-1]


def test_dashboard_line_says_how_to_sign_in_when_the_token_is_asked():
    assert dashboard_message("http://127.0.0.1:8265", False) == "Ray dashboard: http://127.0.0.1:8265"
    assert "sign in with the token that `ray get-auth-token` prints" in dashboard_message("http://h:8265", True)


def test_training_bar_text_has_the_loss_and_each_lambda():
    m = {"loss_objective": 0.123456, "lambda_class_4": 0.5, "lambda_class_7": 0.0}
    assert bar_text(m, ["class_4", "class_7"]) == "train loss 0.1235 λ4 0.500 λ7 0.000"
    assert bar_text(m, []) == "train loss 0.1235"


def test_a_log_gets_a_progress_line_a_minute_with_the_eta(capsys):
    from cdd_ray.progress import LineProgress

    clock = Clock()
    bar = LineProgress(100, 1100, every_s=60, clock=clock)  # resumed at step 100
    for _ in range(10):
        clock.t += 10
        bar.update(20)
        bar.set_description("train loss 0.5000 λ4 0.100")
    assert capsys.readouterr().out.splitlines() == [
        "train loss 0.5000 λ4 0.100: step 220/1100 (20%), 1.0 min, ETA 7.3 min"]  # 2 steps/s since the resume
    bar.close()
    assert capsys.readouterr().out == "train loss 0.5000 λ4 0.100: step 300/1100 (27%), 1.7 min, ETA 6.7 min\n"
