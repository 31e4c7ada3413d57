"""cdd_ray.storage: the same few calls on a local folder and on an S3 bucket (moto's server on 127.0.0.1), the bucket
reached through AWS_ENDPOINT_URL or through the URI's own query, as docs/CLUSTER.md shows both."""

import pytest

from cdd_ray import storage
from support.cluster import s3_server


def test_join_keeps_a_uris_query_at_the_end():
    base = "s3://cdd/runs?endpoint_override=127.0.0.1:9000&scheme=http"
    assert storage.join(base, "sweep", "/trials/", "t1") == (
        "s3://cdd/runs/sweep/trials/t1?endpoint_override=127.0.0.1:9000&scheme=http")
    assert storage.join("s3://cdd/", "a") == "s3://cdd/a" and storage.join("/tmp/x", "a", "b") == "/tmp/x/a/b"
    assert storage.is_uri("gs://b/p") and not storage.is_uri("runs/s3:x")


@pytest.fixture(scope="module")
def bucket(tmp_path_factory):
    with s3_server(tmp_path_factory.mktemp("s3"), "store") as env:
        yield env


def roots(tmp_path, bucket, monkeypatch) -> list[str]:
    """The same store three ways: a folder, s3:// with the endpoint in the environment, s3:// with it in the URI."""
    for k, v in bucket.items():
        monkeypatch.setenv(k, v)
    host = bucket["AWS_ENDPOINT_URL"].removeprefix("http://")
    return [str(tmp_path / "local"), f"s3://store/{tmp_path.name}/env",
            f"s3://store/{tmp_path.name}/query?endpoint_override={host}&scheme=http"]


def test_text_and_bytes_round_trip_and_missing_files_read_as_none(tmp_path, bucket, monkeypatch):
    for root in roots(tmp_path, bucket, monkeypatch):
        f = storage.join(root, "run", "mlflow_run_id")
        assert not storage.exists(f) and storage.read_text(f) is None and storage.read_bytes(f) is None, root
        storage.write_text(f, "abc\n")
        storage.write_text(f, "0123456789abcdef\n")  # replaced whole
        assert storage.exists(f) and storage.read_text(f) == "0123456789abcdef\n", root
        assert storage.read_bytes(f) == b"0123456789abcdef\n", root


def test_a_folder_uploads_and_downloads_whole_and_upload_keeps_what_is_there(tmp_path, bucket, monkeypatch):
    src = tmp_path / "src"
    (src / "unet").mkdir(parents=True)
    (src / "unet" / "weights.bin").write_bytes(bytes(range(256)) * 40)
    (src / "dual_state.json").write_text('{"lam": [0.5]}')
    for i, root in enumerate(roots(tmp_path, bucket, monkeypatch)):
        dst = storage.join(root, "checkpoint")
        storage.write_text(storage.join(dst, "meta.json"), "{}")  # already there, not in src
        storage.upload(src, dst)
        back = storage.download(dst, tmp_path / f"back{i}")
        assert (back / "unet" / "weights.bin").read_bytes() == (src / "unet" / "weights.bin").read_bytes(), root
        assert (back / "dual_state.json").read_text() == '{"lam": [0.5]}' and (back / "meta.json").read_text() == "{}"
