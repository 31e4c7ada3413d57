"""The job's Ray: connect to a cluster or start a Ray of its own on loopback, print the dashboard's address, and
what the job needs to know from it before any training code is imported (the cluster's GPUs, the storage path
Ray wants). Light on purpose: a job refuses what the machine cannot hold within seconds."""

from __future__ import annotations

import contextlib
import logging
import os
import socket

import ray
import ray._private.ray_constants as ray_constants
from ray._private.services import get_ray_address_from_environment

from cdd_ray.cluster.placement import cluster_nodes, joins_cluster, local_nodes
from cdd_ray.config import ConfigError
from cdd_ray.console import dashboard_message, quiet_libraries

log = logging.getLogger(__name__)


def init_ray(address: str = "", dashboard_host: str = "127.0.0.1", *, num_cpus: int | None = None,
             include_dashboard: bool | None = None, log_to_driver: bool = True,
             env_vars: dict[str, str] | None = None, verbose: bool = False) -> None:
    """Connect to ``address`` / RAY_ADDRESS, or start a local Ray with the dashboard on localhost, and print the
    dashboard's address (and how to sign in). ``num_cpus``, ``include_dashboard`` and ``env_vars`` (for every Ray
    process of the job) shape the local Ray only; ``verbose``: Ray's own INFO lines on this console."""
    if ray.is_initialized():
        return
    quiet_libraries(verbose)
    level = logging.INFO if verbose else logging.WARNING
    address = address or os.environ.get("RAY_ADDRESS", "")
    if address:
        # The job's processes on the cluster are told its address, as a local Ray's are (below): Ray Train's
        # placement-group cleaner otherwise looks its cluster up itself and fails wherever another Ray runs on
        # the same node ("Found multiple active Ray instances"), leaving finished trials' groups reserved.
        gcs = cluster_address(address)
        ctx = ray.init(address=address, log_to_driver=log_to_driver, logging_level=level,
                       runtime_env={"env_vars": {"RAY_ADDRESS": gcs}} if gcs else None)
        log.info("connected to Ray cluster at %s", address)
        _print_dashboard(ctx)
        return
    # A Ray of its own, on loopback, whose processes are told its address: Ray's own actors that look their
    # cluster up (Ray Train's placement-group cleaner asks the state API, which otherwise takes the newest Ray
    # started on this machine) then never find another job's local Ray, so two jobs at once each keep their own.
    port = _free_port()
    # Ray Train's preemption watcher follows nodes a cloud may take away; a job's own Ray is this one machine. Off,
    # it also leaves out the error-level line Ray prints for it in every fit ("Actor with class name:
    # 'PreemptionWatcher' ... has constructor arguments in the object store and max_restarts > 0").
    quiet = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}
    num_cpus = num_cpus or int(local_nodes()[0].cpus)  # what the job's checks counted (taskset included)
    with _loopback_ray(port):
        ctx = ray.init(num_cpus=num_cpus, dashboard_host=dashboard_host, include_dashboard=include_dashboard,
                       log_to_driver=log_to_driver, logging_level=level, _node_ip_address="127.0.0.1",
                       runtime_env={"env_vars": {**quiet, **(env_vars or {}), "RAY_ADDRESS": f"127.0.0.1:{port}"}})
    _print_dashboard(ctx)


def cluster_gpus(address: str = "") -> int:
    """GPUs of the cluster the job will run on: with ``address`` / RAY_ADDRESS the cluster's (the driver may be a
    CPU-only head, so this connects to it), else this machine's."""
    if joins_cluster(address):
        try:
            init_ray(address)
        except ConnectionError as e:
            raise ConfigError(f"--address / RAY_ADDRESS: no Ray cluster at {address or os.environ['RAY_ADDRESS']!r} "
                              f"({e})") from None
        return int(sum(n.gpus for n in cluster_nodes()))
    return int(local_nodes()[0].gpus)


def cluster_address(address: str) -> str:
    """The address the job's processes are given for ``address``: as given (host:port), the cluster ``ray.init``
    finds for "auto" (the last ``ray start`` here, else the one Ray running on this machine); "" for a Ray Client
    address (ray://), whose job processes are the cluster's own."""
    if address.startswith("ray://"):
        return ""
    if address == "auto":
        return get_ray_address_from_environment("auto", None)
    return address


@contextlib.contextmanager
def _loopback_ray(port: int):
    """While a local Ray starts: its GCS on ``port`` and every server of it on 127.0.0.1.

    ``ray.init(_node_ip_address="127.0.0.1")`` alone is turned into this machine's network address
    (``ray._private.services.resolve_ip_for_localhost``), and the GCS, the raylet, the agents and every worker then
    listen there or on all interfaces. Ray keeps the loopback address where clusters are off
    (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, read by the driver's ``ray_constants`` and, through the environment
    they inherit, by the processes started now); a job's own Ray is one node, so nothing is lost. Both are put back
    afterwards: a ``ray start --address`` this process runs later must still join clusters.
    """
    saved = {k: os.environ.get(k) for k in ("RAY_GCS_SERVER_PORT", ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR)}
    cluster = ray_constants.ENABLE_RAY_CLUSTER
    os.environ["RAY_GCS_SERVER_PORT"] = str(port)  # read by the local head Ray starts here
    os.environ[ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = cluster
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _print_dashboard(ctx) -> None:
    try:  # Ray 2.60 keeps the check private; the environment variable says the same where it is set
        from ray._private.authentication.authentication_utils import is_token_auth_enabled
    except ImportError:
        def is_token_auth_enabled() -> bool:
            return os.environ.get("RAY_AUTH_MODE", "").lower() == "token"
    url = getattr(ctx, "dashboard_url", None)
    if url:
        print(dashboard_message(f"http://{url}", is_token_auth_enabled()), flush=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
