"""cdd_ray.sweep.confirm and cdd_ray.verdict: which points a sweep confirms, the config a confirmation re-trains,
the points restated over their seeds with differences combined seed by seed, and the verdict's words. The runs
themselves: tests/sweep/test_sweep.py's smoke sweep (--confirm-seeds 1)."""

import io
import json

import numpy as np
import pytest

from cdd_ray.config import ConfigError, build_config
from cdd_ray.seeds import combine
from cdd_ray.sweep import confirm
from cdd_ray.front import verdict
from cdd_ray.verdict import format_verdict, verdict_rows

REFS = [{"role": "baseline-continued"}, {"role": "baseline-rebalanced"}]


def trial(n, **kw):
    return {"role": "trial", "trial_id": f"id{n}", "number": n, **kw}


def test_the_references_and_the_fronts_ends_first_then_the_rest_as_time_holds():
    front = [trial(1), trial(2), trial(3), trial(4)]  # sorted by the first objective: t1 best on it, t4 on the other
    assert confirm.choose(front, REFS, 1) == [*REFS, front[0], front[3], front[1], front[2]]  # no budget: all
    # the 4 planned points' runs of 100 s each, then 250 s more buy two more points at 1 seed, one at 2 seeds
    assert confirm.choose(front, REFS, 1, 100.0, 650.0) == [*REFS, front[0], front[3], front[1], front[2]]
    assert confirm.choose(front, REFS, 1, 100.0, 550.0) == [*REFS, front[0], front[3], front[1]]
    assert confirm.choose(front, REFS, 2, 100.0, 1050.0) == [*REFS, front[0], front[3], front[1]]
    assert confirm.choose(front, REFS, 2, 100.0, 950.0) == [*REFS, front[0], front[3]]
    # too little time left still confirms the planned points: every verdict is against a reference
    assert confirm.choose(front, REFS, 1, 100.0, 10.0) == [*REFS, front[0], front[3]]
    assert confirm.choose(front[:1], REFS, 1, 100.0, 10.0) == [*REFS, front[0]]  # one point is both ends
    assert confirm.choose([], REFS, 1) == REFS


def test_a_confirmation_retrains_the_points_config_with_another_training_seed_and_no_fault(tmp_path):
    cfg = build_config("smoke", overrides={"optim.seed": 3, "fault.fail_at_step": 2, "dual.eta": 0.3})
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_dict()))
    again = confirm.confirm_config(str(tmp_path), trial(2), "sw", 1)
    assert (again.optim.seed, again.optim.train_seed, again.optim.draws_seed) == (3, 4, 4)  # same split and draws
    assert again.fault.fail_at_step == build_config("smoke").fault.fail_at_step and again.dual.eta == 0.3
    assert again.name == "sw-confirm-id2-s1"
    with pytest.raises(ConfigError, match="--confirm-seeds: t02 id2 has no config.json"):
        confirm.confirm_config(str(tmp_path / "none"), trial(2), "sw", 1)


def _run(folder, hits, positions, seed=7):
    """A run's evaluation as cdd_ray.compare reads it: per-sample precision hits over classes 0/1."""
    folder.mkdir(parents=True)
    p = float(np.mean(hits))
    summary = {"class_ids": [0, 1], "sample_seed": seed, "intervals": {"resamples": 200}, "precision": p,
               "precision_ci": [p - 0.05, p + 0.05], "fid_per_class": {"0": 1.0, "1": 2.0}}
    (folder / "summary.json").write_text(json.dumps(summary))
    buf = io.BytesIO()
    np.savez(buf, precision_hits=np.array(hits, bool), class_positions=np.array(positions))
    (folder / "evaluation.npz").write_bytes(buf.getvalue())
    return summary


def test_points_are_restated_over_their_seeds_with_differences_combined_seed_by_seed(tmp_path):
    """A trial at precision 0.8 and 0.6 over two seeds, the reference at 0.7 and 0.5: a seed effect both share.
    Paired seed by seed (the same sample noise: seed 0 with seed 0) the differences are 0.1 and 0.1, so the
    combined interval is the per-seed sampling one; paired across seeds (0.3 and -0.1) it would be about +-0.39.
    The trial's precision is 0.7 over its seeds with the combined interval; the point's own row is not changed; a
    target whose seed 1 left no evaluation keeps its one seed (its seed 2 is not used)."""
    store, outputs = tmp_path / "sweep", tmp_path / "sweep" / "trials"
    pos = [0, 1] * 10
    t, ref, lone = trial(1), {"role": "baseline-continued"}, trial(2)
    for row, folder, hits in ((t, outputs / "id1", [1] * 16 + [0] * 4), (t, store / "confirm" / "id1-s1", [1] * 12 + [0] * 8),
                              (ref, store / "baseline-continued", [1] * 14 + [0] * 6),
                              (ref, store / "confirm" / "baseline-continued-s1", [1] * 10 + [0] * 10),
                              (lone, outputs / "id2", [1] * 20), (lone, store / "confirm" / "id2-s2", [0] * 20)):
        s = _run(folder, hits, pos)
        if folder.parent.name != "confirm":
            row.update(precision=s["precision"], precision_ci=s["precision_ci"])
    targets = [ref, t, lone]
    before = json.dumps(targets)
    runs = confirm.seed_runs(targets, 2, str(store), str(outputs))
    assert [len(runs[k]) for k in ("baseline-continued", "id1", "id2")] == [2, 2, 1]
    rows = confirm.restate(targets, runs, ("precision",))
    assert json.dumps(targets) == before  # the single-seed rows (pareto.csv, differences.csv) stay as they were
    r_ref, r_t, r_lone = rows
    assert (r_t["seeds"], r_t["precision"], r_t["precision_seeds"]) == (2, pytest.approx(0.7), [0.8, 0.6])
    assert r_t["precision_ci"] == pytest.approx(combine([0.8, 0.6], [[0.75, 0.85], [0.55, 0.65]])[1])
    d = r_t["differences"]["baseline-continued"]["precision"]
    assert d[0] == pytest.approx(0.1) and d[1] < 0.1 < d[2] and d[2] - d[1] < 0.3  # across seeds: about 0.78
    assert r_lone["seeds"] == 1 and r_lone["precision"] == 1.0
    assert r_lone["differences"]["baseline-continued"]["precision"][0] == pytest.approx(0.3)  # seed 0 only
    assert "baseline-continued" not in r_ref["differences"]
    assert confirm.confirmed_front(rows, ("precision", "tv_to_uniform")) == []  # no tv: nothing to rank on


def test_one_seed_keeps_its_own_interval():
    """A point with one seed keeps its measured (possibly asymmetric) interval: a difference shown on one seed is
    not turned into 'not distinguishable' by a symmetric restatement."""
    from cdd_ray.seeds import combine_differences

    assert combine_differences([[0.02, 0.001, 0.05]]) == [0.02, 0.001, 0.05]


def test_the_verdict_words_and_table():
    refs = [{"role": "baseline-continued", "seeds": 2, "differences": {}},
            {"role": "baseline-rebalanced", "seeds": 2,
             "differences": {"baseline-continued": {"precision": [-0.05, -0.09, -0.01], "copy_rate": [0.0, -0.01, 0.01]}}}]
    t1 = {**trial(1), "seeds": 2, "differences": {
        "baseline-continued": {"precision": [0.02, -0.01, 0.05], "tv_to_uniform": [-0.1, -0.15, -0.05]},
        "baseline-rebalanced": {"precision": [0.07, 0.03, 0.11], "tv_to_uniform": [0.04, 0.01, 0.07]}}}
    t2 = {**trial(2), "seeds": 1, "differences": {"baseline-continued": {"precision": [0.1, 0.05, 0.15]}}}
    rows = verdict_rows([*refs, t1, t2], [t1], ("precision", "tv_to_uniform", "copy_rate"))
    got = {(r["point"], r["reference"], r["metric"]): (r["verdict"], r["on_front"], r["seeds"]) for r in rows}
    assert got == {
        ("baseline-rebalanced", "baseline-continued", "precision"): ("worse", "-", 2),
        ("baseline-rebalanced", "baseline-continued", "copy_rate"): ("not distinguishable", "-", 2),
        ("t01 id1", "baseline-continued", "precision"): ("not distinguishable", True, 2),
        ("t01 id1", "baseline-continued", "tv_to_uniform"): ("better", True, 2),  # lower tv is fairer
        ("t01 id1", "baseline-rebalanced", "precision"): ("better", True, 2),
        ("t01 id1", "baseline-rebalanced", "tv_to_uniform"): ("worse", True, 2),
        ("t02 id2", "baseline-continued", "precision"): ("better", False, 1)}
    assert verdict("tv_to_uniform", [0.0, -0.1, 0.1]) == "not distinguishable"
    table = format_verdict(rows, ("precision", "tv_to_uniform", "copy_rate")).splitlines()
    assert table[0] == ("| point | reference | seeds | precision (point - reference) | tv_to_uniform (point - reference) "
                        "| copy_rate (point - reference) |")
    assert table[2] == ("| baseline-rebalanced | baseline-continued | 2 | -0.050 [-0.090, -0.010] worse | - | "
                        "+0.000 [-0.010, +0.010] not distinguishable |")
    assert table[4] == ("| t01 id1 | baseline-rebalanced | 2 | +0.070 [+0.030, +0.110] better | "
                        "+0.040 [+0.010, +0.070] worse | - |")
    assert len(table) == 5  # t02 is off the front: in verdict.csv, not in the printed table
