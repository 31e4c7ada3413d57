"""Small helpers shared by tests: local HTTP servers (MLflow UI / tracking server), Ray placement groups."""

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_health(base: str, proc: subprocess.Popen, what: str, seconds: float = 90, path: str = "/health") -> None:
    """Poll ``base + path`` until it answers; fail if ``proc`` exits or ``seconds`` pass."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            urllib.request.urlopen(base + path, timeout=2)
            return
        except OSError:
            assert proc.poll() is None, f"{what} exited"
            assert time.monotonic() < deadline, f"{what} did not answer within {seconds:g} s"
            time.sleep(0.3)


def placement_groups_left(seconds: float = 60) -> list[dict]:
    """The connected Ray's placement groups not REMOVED, once none is left or after ``seconds``. Ray Train's cleaner
    removes the group of a trial Tune stopped when it sees the trial's controller dead (it polls every second through
    the state API: seconds on a busy machine); a group that leaked stays CREATED for ever."""
    import ray

    deadline = time.monotonic() + seconds
    while True:
        left = [g for g in ray.util.placement_group_table().values() if g["state"] != "REMOVED"]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.5)


def end_process_group(proc: subprocess.Popen, grace: float = 20) -> None:
    """SIGTERM a process started with ``start_new_session=True`` and its children; SIGKILL after ``grace`` s."""
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


@contextlib.contextmanager
def mlflow_ui(store: str, cwd, *extra: str):
    """The README's ``mlflow ui --backend-store-uri STORE --host 127.0.0.1`` on a free port; yields its address.
    It only reads the store: its job runner (GenAI judges) stays off, and it gets 5 s to end."""
    port = free_port()
    mlflow_bin = os.path.join(os.path.dirname(sys.executable), "mlflow")
    proc = subprocess.Popen([mlflow_bin, "ui", "--backend-store-uri", store, "--host", "127.0.0.1",
                             "--port", str(port), *extra], cwd=cwd, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True,
                            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    try:
        base = f"http://127.0.0.1:{port}"
        wait_for_health(base, proc, "mlflow ui", seconds=120)
        yield base
    finally:
        end_process_group(proc, grace=5)
