"""Sizing workers and trials from the cluster's nodes (cdd_ray.cluster.placement), never from the driver's devices."""

from __future__ import annotations

import os

import pytest

from cdd_ray.cluster.placement import Node, fits, sweep_resources, worker_resources
from cdd_ray.config import ConfigError, build_config

GPU_CLUSTER = [Node(8), Node(32, 4), Node(32, 4)]  # a CPU-only head and two GPU nodes
UNEVEN = [Node(16), Node(4)]


def cfg(**overrides):
    return build_config("cpu", overrides=overrides)


@pytest.mark.parametrize("nodes, overrides, per_worker", [
    ([Node(2)], {}, {"CPU": 2}),
    ([Node(2)], {"ray.workers": 2}, {"CPU": 1}),
    (UNEVEN, {}, {"CPU": 16}),
    (UNEVEN, {"ray.workers": 2}, {"CPU": 8}),  # not 10 (= 20 / 2): no node has 10 for the second worker
    (UNEVEN, {"ray.workers": 3}, {"CPU": 16 / 3}),
    (UNEVEN, {"ray.workers": 5}, {"CPU": 4}),  # four on the 16-CPU node, one on the 4-CPU node
    ([Node(1), Node(1)], {}, {"CPU": 1}),  # the 2-node cluster: not the 2 CPUs no node has
    ([Node(1), Node(1)], {"ray.workers": 2}, {"CPU": 1}),
    ([Node(1), Node(1)], {"ray.workers": 3}, {"CPU": 0.5}),
    (GPU_CLUSTER, {"ray.gpu": True}, {"CPU": 8, "GPU": 1}),  # its GPU's share of its node, not 32
    (GPU_CLUSTER, {"ray.gpu": True, "ray.workers": 8}, {"CPU": 8, "GPU": 1}),
    (GPU_CLUSTER, {"ray.gpu": True, "ray.workers": 2, "ray.cpus_per_worker": 16}, {"CPU": 16, "GPU": 1}),
])
def test_a_run_asks_each_worker_for_what_one_node_has(nodes, overrides, per_worker):
    c = cfg(**overrides)
    per = worker_resources(nodes, c)
    assert per == pytest.approx(per_worker)
    assert max(n.cpus for n in nodes) >= per["CPU"] and fits(nodes, 1, c.ray.workers, per["CPU"], c.ray.gpu)


@pytest.mark.parametrize("nodes, overrides, message", [
    ([Node(2)], {"ray.workers": 5}, r"ray.workers=5 does not fit the cluster's nodes \(2 CPUs\): a CPU worker needs "
                                    r">= 0.5 CPUs of one node"),
    (UNEVEN, {"ray.cpus_per_worker": 17}, r"ray.workers=1 x ray.cpus_per_worker=17 does not fit the cluster's nodes "
                                          r"\(16 CPUs, 4 CPUs\): a worker runs on one node"),
    (UNEVEN, {"ray.workers": 2, "ray.cpus_per_worker": 10}, "ray.cpus_per_worker=10 does not fit"),  # 20 CPUs in all
    (GPU_CLUSTER, {"ray.gpu": True, "ray.workers": 9}, r"needs 9 GPUs; the cluster has 8 \(nodes: 8 CPUs, 32 CPUs "
                                                       r"\+ 4 GPUs, 32 CPUs \+ 4 GPUs\)"),
    (GPU_CLUSTER, {"ray.gpu": True, "ray.cpus_per_worker": 33}, "ray.cpus_per_worker=33 does not fit"),
    ([Node(64)], {"ray.gpu": True}, r"needs 1 GPUs; the cluster has 0"),
])
def test_what_no_node_can_hold_is_refused_before_any_run(nodes, overrides, message):
    with pytest.raises(ConfigError, match=message):
        worker_resources(nodes, cfg(**overrides))


@pytest.mark.parametrize("nodes, overrides, trials, per_worker", [
    ([Node(2)], {}, 2, {"CPU": 0.9}),
    ([Node(16)], {"ray.workers": 2}, 8, {"CPU": 0.95}),
    ([Node(16)], {"ray.workers": 4, "ray.cpus_per_worker": 2}, 1, {"CPU": 2}),
    ([Node(17)], {"ray.workers": 2, "ray.cpus_per_worker": 4}, 2, {"CPU": 4}),
    ([Node(64, 8)], {"ray.gpu": True}, 8, {"CPU": 7.9, "GPU": 1.0}),
    ([Node(64, 8)], {"ray.gpu": True, "ray.workers": 2}, 4, {"CPU": 7.95, "GPU": 1.0}),
    (GPU_CLUSTER, {"ray.gpu": True}, 8, {"CPU": 8, "GPU": 1.0}),  # trial drivers on the head's CPUs
    (GPU_CLUSTER, {"ray.gpu": True, "ray.workers": 4}, 2, {"CPU": 8, "GPU": 1.0}),
    (UNEVEN, {}, 20, {"CPU": 0.9}),
    (UNEVEN, {"ray.workers": 2}, 10, {"CPU": 0.95}),  # 16 + 4 workers, drivers in the 0.8 and 0.2 left
    ([Node(1), Node(1)], {}, 2, {"CPU": 0.9}),
    ([Node(1), Node(1)], {"ray.workers": 2, "ray.cpus_per_worker": 1}, 0, None),  # cannot fit a trial's driver too
])
def test_a_sweep_places_every_trials_workers_and_driver(nodes, overrides, trials, per_worker):
    c = cfg(**overrides)
    if per_worker is None:
        with pytest.raises(ConfigError, match=r"\+ 0.1 for the trial does not fit the cluster's nodes"):
            sweep_resources(nodes, c)
        return
    n, per = sweep_resources(nodes, c)
    assert n == trials and per == pytest.approx(per_worker)
    assert fits(nodes, n, c.ray.workers, per["CPU"], c.ray.gpu, driver_cpu=0.1)
    assert not fits(nodes, n + 1, c.ray.workers, per["CPU"], c.ray.gpu, driver_cpu=0.1)


def test_fits_places_workers_on_one_node_each():
    assert fits([Node(16), Node(4)], 1, 2, 8, gpu=False)
    assert not fits([Node(16), Node(4)], 1, 2, 10, gpu=False)  # 20 CPUs in all, but no second node of 10
    assert not fits([Node(32, 4), Node(64)], 1, 5, 1, gpu=True)  # the GPU-less node holds no GPU worker
    assert fits([Node(1), Node(1)], 1, 1, 1, gpu=False, driver_cpu=0.1)  # the driver goes to the other node
    assert not fits([Node(1)], 1, 1, 1, gpu=False, driver_cpu=0.1)


def test_a_local_job_is_checked_against_this_machine_before_its_ray_starts(monkeypatch):
    """Without --address / RAY_ADDRESS the job would start a Ray on this machine: what it cannot hold is refused
    from this machine's CPUs and GPUs, as Ray would count them; a job that joins a cluster is checked there."""
    import cdd_ray.cluster.placement as placement

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(placement, "local_nodes", lambda: [Node(2)])
    with pytest.raises(ConfigError, match=r"ray.workers=64 does not fit the cluster's nodes \(2 CPUs\): a CPU worker "
                                          r"needs >= 0.5 CPUs of one node; the cluster would be this machine"):
        placement.check_this_machine(cfg(**{"ray.workers": 64}))
    with pytest.raises(ConfigError, match=r"needs 1 GPUs; the cluster has 0 .*the cluster would be this machine"):
        placement.check_this_machine(cfg(**{"ray.gpu": True}), sweep=True)
    placement.check_this_machine(cfg(**{"ray.workers": 2}), sweep=True)  # fits: nothing said
    monkeypatch.setattr(placement, "local_nodes", lambda: [Node(2, 1)])
    placement.check_this_machine(cfg(**{"ray.gpu": True}))
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")  # a cluster: its own nodes decide, after connecting
    placement.check_this_machine(cfg(**{"ray.workers": 64}))
    monkeypatch.delenv("RAY_ADDRESS")
    assert placement.check_this_machine(cfg(**{"ray.workers": 64, "ray.address": "10.0.0.1:6379"})) is None


def test_local_nodes_count_this_machine_as_ray_does():
    import torch
    from ray._private.utils import get_num_cpus

    from cdd_ray.cluster.placement import local_nodes

    assert local_nodes() == [Node(float(min(get_num_cpus(), len(os.sched_getaffinity(0)))),
                                  float(torch.cuda.device_count()))]
    assert local_nodes()[0].cpus >= 1


def test_a_job_pinned_to_one_core_counts_one_cpu_and_its_ray_gets_one():
    """``taskset -c 0 python jobs/...``: the job's checks and the Ray it starts see the one core it may run on (Ray
    alone would count every core and give a worker threads that only share it)."""
    import subprocess
    import sys

    code = ("import ray; from cdd_ray.cluster.placement import local_nodes; from cdd_ray.cluster.session import "
            "init_ray; print(local_nodes()[0].cpus); init_ray(include_dashboard=False); "
            "print(ray.cluster_resources()['CPU']); ray.shutdown()")
    p = subprocess.run(["taskset", "-c", "0", sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=120, env=os.environ | {"RAY_AUTH_MODE": "disabled"})
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.split()[-2:] == ["1.0", "1.0"], p.stdout


@pytest.mark.parametrize("job", [["train_mnist.py", "--preset", "smoke"], ["tune_mnist.py", "--smoke"]])
def test_jobs_refuse_what_this_machine_cannot_hold_in_seconds(tmp_path, job):
    """The README's jobs as a user types them, asking for 64 workers on this machine: refused in under 5 s (no Ray
    started, the training code not even imported), naming the workers and the machine's CPUs."""
    import os
    import subprocess
    import sys
    import time
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    script = Path(__file__).resolve().parents[2] / "jobs" / job[0]
    t = time.monotonic()
    p = subprocess.run([sys.executable, str(script), *job[1:], "--workers", "64", "--storage", str(tmp_path / "ray")],
                       capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env)
    took = time.monotonic() - t
    assert p.returncode == 2, p.stderr[-3000:]
    assert "error: ray.workers=64 does not fit the cluster's nodes (" in p.stderr
    assert "the cluster would be this machine" in p.stderr and "dashboard" not in p.stdout + p.stderr
    assert took < 5, f"{took:.1f} s"
    assert not (tmp_path / "ray").exists()
