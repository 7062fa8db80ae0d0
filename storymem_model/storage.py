"""Storage through fsspec: local paths and s3:// URIs, whole-file atomic writes.

Every artifact is written whole under a deterministic key. Locally a write goes to a
temporary name in the same folder and is renamed into place; on S3 a PUT is atomic by
nature (an object appears complete or not at all). Readers trust only what a commit
marker lists.
"""
from __future__ import annotations

import os
import posixpath
import uuid

import fsspec
from fsspec.core import url_to_fs

S3_ENDPOINT_ENV = "STORYMEM_S3_ENDPOINT_URL"


class StorageError(RuntimeError):
    """A storage URI that cannot be used, with the URI and the reason."""


def storage_options(uri: str) -> dict:
    """fsspec options for `uri`: the S3 endpoint comes from STORYMEM_S3_ENDPOINT_URL."""
    if uri.startswith("s3://") or uri.startswith("s3a://"):
        endpoint = os.environ.get(S3_ENDPOINT_ENV)
        if endpoint:
            return {"client_kwargs": {"endpoint_url": endpoint}}
    return {}


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path inside it) for a local path or an fsspec URL."""
    if not isinstance(uri, str) or not uri.strip():
        raise StorageError(f"not a storage URI: {uri!r}")
    try:
        return url_to_fs(uri, **storage_options(uri))
    except (ValueError, ImportError) as exc:
        raise StorageError(f"cannot open storage URI {uri!r}: {exc}") from exc


def join(uri: str, *parts: str) -> str:
    """Join key parts onto a URI with forward slashes (also for local paths)."""
    base = uri.rstrip("/")
    return posixpath.join(base, *[p.strip("/") for p in parts])


def write_bytes(uri: str, data: bytes) -> None:
    """Write `data` to `uri` so the file appears complete or not at all."""
    fs, path = filesystem(uri)
    parent = posixpath.dirname(path)
    if _is_local(fs):
        os.makedirs(parent or ".", exist_ok=True)
        tmp = posixpath.join(parent, f".{posixpath.basename(path)}.{uuid.uuid4().hex}.tmp")
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    else:
        fs.pipe_file(path, data)


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem(uri)
    try:
        return fs.cat_file(path)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise StorageError(f"cannot read {uri}: {exc}") from exc


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.exists(path)


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return protocol in ("file", "local")
