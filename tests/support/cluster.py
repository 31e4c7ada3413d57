"""What the cluster tests start on this machine, all on 127.0.0.1, each ended by the process ids it started:

- ``s3_server``: moto's S3-compatible server and one bucket (credentials and endpoint through the standard AWS
  environment variables, which pyarrow, boto3 and so Ray and MLflow all read);
- ``ray_cluster``: a real multi-node Ray cluster, a head and worker nodes started by ``ray start --block``, each
  with its own ports, temporary folder, $HOME and working directory (no ``data/`` there);
- ``mlflow_server``: ``mlflow server`` with a SQLite backend and its artifacts in the S3 bucket.

Never ``ray stop``: that would end every Ray on the machine.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Iterator

from support.helpers import free_port

BIN = Path(sys.executable).parent


def wait_for(check, what: str, timeout: float = 90.0, proc: subprocess.Popen | None = None, log: Path | None = None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what}: exited with {proc.returncode}\n{log.read_text()[-4000:] if log else ''}")
        try:
            result = check()
            if result:
                return result
        except Exception:  # noqa: BLE001 - not up yet
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{what}: not up after {timeout:.0f} s\n{log.read_text()[-4000:] if log else ''}")


def stop(procs: list[subprocess.Popen]) -> None:
    """SIGTERM to each process group we started (``ray start --block`` ends its node's processes), then SIGKILL
    to whatever of those groups is left."""
    import psutil

    tree = []
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            tree += [p.pid] + [c.pid for c in psutil.Process(p.pid).children(recursive=True)]
    for p in procs:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGTERM)
    deadline = time.time() + 5
    for p in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(timeout=max(0.1, deadline - time.time()))
    for pid in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            psutil.Process(pid).kill()
    for p in procs:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(timeout=10)


def _popen(cmd: list[str], log: Path, env: dict[str, str], cwd: Path) -> subprocess.Popen:
    f = open(log, "w")  # noqa: SIM115 - closed with the process
    return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True)


BASE_ENV = {"MLFLOW_DISABLE_TELEMETRY": "true", "RAY_AUTH_MODE": "disabled", "DO_NOT_TRACK": "1",
            "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0"}


@contextlib.contextmanager
def s3_server(tmp: Path, bucket: str = "cdd") -> Iterator[dict[str, str]]:
    """moto_server on 127.0.0.1 with ``bucket``; yields the AWS environment a client needs."""
    port = free_port()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    log = tmp / "moto.log"
    proc = _popen([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)], log,
                  {**os.environ, **BASE_ENV}, tmp)
    try:
        s3 = s3_client(env)
        wait_for(lambda: s3.list_buckets() is not None, "moto_server", proc=proc, log=log)
        s3.create_bucket(Bucket=bucket)
        yield env
    finally:
        stop([proc])


def s3_client(env: dict[str, str]):
    import boto3

    return boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"], region_name=env["AWS_DEFAULT_REGION"])


def read_object(env: dict[str, str], bucket: str, key: str) -> str:
    return s3_client(env).get_object(Bucket=bucket, Key=key)["Body"].read().decode()


def list_bucket(env: dict[str, str], bucket: str, prefix: str = "") -> list[str]:
    s3 = s3_client(env)
    keys = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys += [o["Key"] for o in page.get("Contents", [])]
    return keys


def _node_ports() -> list[str]:
    lo = free_port()
    return ["--node-manager-port", str(free_port()), "--object-manager-port", str(free_port()),
            "--runtime-env-agent-port", str(free_port()), "--dashboard-agent-grpc-port", str(free_port()),
            "--dashboard-agent-listen-port", str(free_port()), "--metrics-export-port", str(free_port()),
            "--min-worker-port", str(20000 + lo % 20000), "--max-worker-port", str(20000 + lo % 20000 + 40)]


@contextlib.contextmanager
def ray_cluster(tmp: Path, nodes: list[dict], env: dict[str, str], ray_tmp: str = "") -> Iterator[str]:
    """A head node and worker nodes, each ``{"cpus": n, "gpus": n, "resources": {...}}``; yields the address.
    ``ray_tmp``: the cluster's Ray temporary folder (its logs under ``session_latest/logs``), removed at the end.

    GPUs here are declared resources (no device): what a cluster advertises is what the code must size from.
    """
    address = ""
    procs: list[subprocess.Popen] = []
    ray_tmp = ray_tmp or tempfile.mkdtemp(prefix="cddray-", dir="/tmp")  # short: socket paths must fit 107 bytes
    try:
        for i, node in enumerate(nodes):
            home = tmp / f"node{i}"
            (home / "home").mkdir(parents=True, exist_ok=True)
            node_env = {**os.environ, **BASE_ENV, **env, "HOME": str(home / "home"), "OMP_NUM_THREADS": "1",
                        "CDD_RAY_CACHE": str(home / "cache"), "PATH": f"{BIN}:{os.environ.get('PATH', '')}"}
            node_env.pop("RAY_ADDRESS", None)
            log = tmp / f"node{i}.log"
            # A port free_port() found free can be taken by another Ray of the machine (the suite's other worker)
            # before this node binds it: Ray then exits with "address already in use". And Ray waits a fixed 30 s
            # for a new node's raylet to register, which a busy 2-core machine can miss ("The current node timed
            # out during startup"; seen when the suite's two workers start Rays at once). Start again, new ports.
            for attempt in range(3):
                cmd = [str(BIN / "ray"), "start", "--block", "--node-ip-address", "127.0.0.1",
                       "--num-cpus", str(node.get("cpus", 1)), "--num-gpus", str(node.get("gpus", 0)),
                       "--resources", json.dumps({f"node{i}": 1, **node.get("resources", {})}),
                       "--disable-usage-stats", *_node_ports()]
                if i == 0:
                    port = free_port()
                    address = f"127.0.0.1:{port}"
                    cmd += ["--head", "--port", str(port), "--temp-dir", ray_tmp,
                            "--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
                            "--dashboard-port", str(free_port()), "--ray-client-server-port", str(free_port())]
                else:  # a temporary folder of its own, as on another machine: a worker node otherwise takes the
                    # head's, and on one machine both nodes unpack a job's working directory into the same folder,
                    # which the worker node deletes when its workers end (under the head's job driver)
                    cmd += ["--address", address, "--temp-dir", f"{ray_tmp}-{i}"]
                proc = _popen(cmd, log, node_env, home)
                try:
                    wait_for(lambda: "Ray runtime started" in log.read_text(), f"ray node {i}", proc=proc, log=log)
                    break
                except RuntimeError:
                    stop([proc])
                    text = log.read_text()
                    if attempt == 2 or ("address already in use" not in text
                                        and "timed out during startup" not in text):
                        raise
            procs.append(proc)
        wait_for(lambda: _alive_nodes(address, tmp) >= len(nodes), f"{len(nodes)} ray nodes", timeout=120,
                 proc=procs[-1], log=tmp / f"node{len(nodes) - 1}.log")
        yield address
    finally:
        stop(procs)
        for folder in [ray_tmp, *(f"{ray_tmp}-{i}" for i in range(1, len(nodes)))]:
            shutil.rmtree(folder, ignore_errors=True)


def _alive_nodes(address: str, tmp: Path) -> int:
    code = ("import ray, sys; ray.init(address=sys.argv[1], log_to_driver=False); "
            "print(sum(1 for n in ray.nodes() if n['Alive']))")
    out = subprocess.run([sys.executable, "-c", code, address], capture_output=True, text=True, timeout=60,
                         env={**os.environ, **BASE_ENV}, cwd=tmp)
    return int(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 and out.stdout.strip() else 0


def dashboard_url(address: str) -> str:
    """The cluster's dashboard (``ray job submit --address``), as its head reports it."""
    code = "import ray, sys; print(ray.init(address=sys.argv[1], log_to_driver=False).dashboard_url)"
    out = subprocess.run([sys.executable, "-c", code, address], capture_output=True, text=True, timeout=120,
                         env={**os.environ, **BASE_ENV, "RAY_ADDRESS": address})
    assert out.returncode == 0, out.stderr[-3000:]
    return "http://" + out.stdout.strip().splitlines()[-1]


@contextlib.contextmanager
def mlflow_server(tmp: Path, env: dict[str, str], artifacts: str) -> Iterator[str]:
    """``mlflow server`` (SQLite backend, artifacts proxied to ``artifacts``, e.g. s3://bucket/mlflow)."""
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    log = tmp / "mlflow_server.log"
    proc = _popen([str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
                   "--backend-store-uri", f"sqlite:///{tmp / 'mlflow_server.db'}",
                   "--artifacts-destination", artifacts, "--workers", "1"],
                  log, {**os.environ, **BASE_ENV, **env, "MLFLOW_S3_ENDPOINT_URL": env["AWS_ENDPOINT_URL"]}, tmp)
    try:
        wait_for(lambda: urllib.request.urlopen(f"{uri}/health", timeout=2).status == 200, "mlflow server",
                 timeout=120, proc=proc, log=log)
        yield uri
    finally:
        stop([proc])
