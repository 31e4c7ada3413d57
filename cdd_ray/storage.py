"""Ray run storage, a local folder or a URI pyarrow opens (``s3://bucket/prefix``, ``gs://...``), read and written
with the same few calls, so that nothing a run or a sweep needs lives only on the driver's disk.

A URI keeps its query (``s3://bucket/runs?endpoint_override=127.0.0.1:9000&scheme=http``) when joined; an
S3-compatible endpoint can also come from ``AWS_ENDPOINT_URL`` (docs/CLUSTER.md).
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit


def is_uri(path: str) -> bool:
    return "://" in path


def join(base: str, *parts: str) -> str:
    """``base``/part/... for a local path or a URI (its query kept at the end)."""
    if not is_uri(base):
        return os.path.join(base, *parts)
    u = urlsplit(base)
    path = "/".join([u.path.rstrip("/"), *(p.strip("/") for p in parts)])
    return urlunsplit((u.scheme, u.netloc, path, u.query, u.fragment))


def filesystem(path: str):
    """(pyarrow file system, path within it) for a local path or a URI."""
    import pyarrow.fs

    if not is_uri(path):
        return pyarrow.fs.LocalFileSystem(), os.path.abspath(path)
    return pyarrow.fs.FileSystem.from_uri(path)


def exists(path: str) -> bool:
    import pyarrow.fs

    fs, p = filesystem(path)
    return fs.get_file_info(p).type != pyarrow.fs.FileType.NotFound


def read_text(path: str) -> str | None:
    """The file's text, or None when there is no such file."""
    if not is_uri(path):
        return Path(path).read_text() if Path(path).is_file() else None
    if not exists(path):
        return None
    fs, p = filesystem(path)
    with fs.open_input_stream(p) as f:
        return f.read().decode()


def read_bytes(path: str) -> bytes | None:
    """The file's bytes, or None when there is no such file."""
    if not exists(path):
        return None
    fs, p = filesystem(path)
    with fs.open_input_stream(p) as f:
        return f.read()


def write_text(path: str, text: str) -> None:
    if not is_uri(path):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        tmp = f"{path}.tmp"
        Path(tmp).write_text(text)
        os.replace(tmp, path)
        return
    fs, p = filesystem(path)
    with fs.open_output_stream(p) as f:
        f.write(text.encode())


def upload(local: str | Path, dst: str) -> None:
    """Copy a local folder's files into ``dst`` (a folder in storage); files already there and not in ``local``
    stay."""
    import pyarrow.fs

    fs, p = filesystem(dst)
    pyarrow.fs.copy_files(str(local), p, source_filesystem=pyarrow.fs.LocalFileSystem(), destination_filesystem=fs)


def download(src: str, local: str | Path) -> Path:
    """Copy a folder of storage to the local folder ``local`` (created); returns it."""
    import pyarrow.fs

    local = Path(local)
    local.mkdir(parents=True, exist_ok=True)
    fs, p = filesystem(src)
    pyarrow.fs.copy_files(p, str(local), source_filesystem=fs, destination_filesystem=pyarrow.fs.LocalFileSystem())
    return local
