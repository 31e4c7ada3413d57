"""The README's `mlflow ui` command on the default store answers on 127.0.0.1 and lists the runs."""

import json
import socket
import urllib.request

from cdd_ray import tracking
from cdd_ray.config import build_config
from support.helpers import mlflow_ui


def test_mlflow_ui_lists_runs_of_the_default_store(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    monkeypatch.chdir(tmp_path)
    uri = tracking.tracking_uri()  # the default: sqlite:///<cwd>/mlflow.db
    run_ids = {tracking.start_run(build_config("smoke", overrides={"name": f"ui-{i}"}), uri) for i in range(2)}
    exp_id = tracking.get_or_create_experiment(uri)
    with mlflow_ui("sqlite:///mlflow.db", tmp_path) as base:
        req = urllib.request.Request(base + "/api/2.0/mlflow/runs/search",
                                     data=json.dumps({"experiment_ids": [exp_id]}).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
        runs = json.loads(urllib.request.urlopen(req, timeout=10).read())["runs"]
        assert {r["info"]["run_id"] for r in runs} == run_ids
        port = int(base.rsplit(":", 1)[1])
        with socket.socket() as s:  # bound to loopback only
            assert s.connect_ex((socket.gethostbyname(socket.gethostname()), port)) != 0 or \
                socket.gethostbyname(socket.gethostname()).startswith("127.")
