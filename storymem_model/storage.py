"""Storage through fsspec: local paths and s3:// URIs, whole-file atomic writes.

Every artifact is written whole under a deterministic key. Locally a write goes to a
temporary name in the same folder and is renamed into place; on S3 a PUT is atomic by
nature (an object appears complete or not at all). Readers trust only what a commit
marker lists.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import posixpath
import re
import uuid

import fsspec
from fsspec.core import url_to_fs

S3_ENDPOINT_ENV = "STORYMEM_S3_ENDPOINT_URL"
# The temporary file of a local write: `.{name}.{32 hex}.tmp` beside its target.
UNFINISHED_WRITE_NAME = re.compile(r"\..+\.[0-9a-f]{32}\.tmp")

log = logging.getLogger(__name__)


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
    """Join key parts onto a URI with forward slashes (also for local paths). A part that
    would climb out of `uri` (a ".." segment) is refused: keys come from ids, never paths."""
    base = uri.rstrip("/")
    cleaned = [p.strip("/") for p in parts]
    for part in cleaned:
        if ".." in part.split("/"):
            raise StorageError(f"refusing key {part!r} under {uri}: '..' is not allowed")
    return posixpath.join(base, *cleaned)


def absolute_uri(uri: str) -> str:
    """A local path made absolute (so a stored URI still works from another folder);
    URLs are returned unchanged. StorageError for what is no path or URI at all."""
    if not isinstance(uri, str) or not uri.strip():
        raise StorageError(f"not a storage URI: {uri!r}")
    if "://" in uri:
        return uri
    return os.path.abspath(uri)


def write_bytes(uri: str, data: bytes) -> None:
    """Write `data` to `uri` so the file appears complete or not at all."""
    fs, path = filesystem(uri)
    parent = posixpath.dirname(path)
    if _is_local(fs):
        os.makedirs(parent or ".", exist_ok=True)
        # UNFINISHED_WRITE_NAME: what a killed process leaves behind here
        tmp = posixpath.join(parent, f".{posixpath.basename(path)}.{uuid.uuid4().hex}.tmp")
        try:
            with open(tmp, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):  # a failed write leaves nothing behind
                os.remove(tmp)
            raise
        _fsync_folder(parent or ".")  # the rename itself survives a power loss
    else:
        fs.pipe_file(path, data)


def is_unfinished_write(name: str) -> bool:
    """Whether a file name is the temporary file of a local write (`write_bytes`)."""
    return UNFINISHED_WRITE_NAME.fullmatch(name) is not None


def _fsync_folder(folder: str) -> None:
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass  # some file systems cannot fsync a folder
    finally:
        os.close(descriptor)


class TooLarge(StorageError):
    """An object over the size a reader accepts; it was not read whole."""


def read_bytes(uri: str, max_bytes: int | None = None) -> bytes:
    """The whole object at `uri`. With `max_bytes`, at most that many bytes are ever read:
    a larger object (a multi-GB file, /dev/zero, a stream without a size) raises TooLarge
    naming the limit, after reading max_bytes + 1 bytes at most."""
    fs, path = filesystem(uri)
    try:
        if max_bytes is None:
            return fs.cat_file(path)
        # A ranged read: on S3 one GET with a Range and no ETag check, so an object being
        # replaced while it is read is read whole, old or new (open() + read() checks the
        # ETag it saw first and fails when the object changes in between).
        data = fs.cat_file(path, start=0, end=max_bytes + 1)
    except FileNotFoundError:
        raise
    except IsADirectoryError:
        raise StorageError(f"cannot read {uri}: it is a folder") from None
    except OSError as exc:
        if exc.errno == errno.EINVAL and "range" in str(exc).lower():
            return b""  # S3 answers a range on an empty object with InvalidRange
        raise StorageError(f"cannot read {uri}: {exc}") from exc
    if len(data) > max_bytes:
        raise TooLarge(f"{uri} is larger than the limit of {max_bytes} bytes; not read")
    return data


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.exists(path)


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return protocol in ("file", "local")


# ---------------------------------------------------------------------------------------
# Listing, removal and commit markers

COMMIT_MARKER = "_COMMITTED.json"
COMMIT_FORMAT = 1


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def list_files(uri: str) -> list[str]:
    """Every file under `uri` (recursively), as sorted paths relative to it; [] if absent.
    Temporary files of unfinished local writes (`is_unfinished_write`) are left out."""
    fs, root = filesystem(uri)
    root = root.rstrip("/")
    if not fs.exists(root):
        return []
    if hasattr(fs, "invalidate_cache"):
        fs.invalidate_cache(root)
    out = []
    for path in fs.find(root):
        rel = path[len(root):].lstrip("/") if path.startswith(root) else path
        if is_unfinished_write(posixpath.basename(rel)):
            continue
        out.append(rel)
    return sorted(out)


def remove_unfinished_writes(folder_uri: str) -> list[str]:
    """Remove the temporary files of local writes a killed process never finished under
    `folder_uri`; returns their paths ([] on object stores and for folders that do not
    exist).

    A process killed between writing a temporary file and renaming it (SIGKILL, a lost
    node) leaves it behind. Readers never see it (`list_files` skips it, commit markers
    list only real files), but it must not stay: the writer that next owns the folder
    (it holds the output lock) removes it. S3 writes are single PUTs: an object is whole
    or absent, so there is nothing to remove there."""
    fs, root = filesystem(folder_uri)
    if not _is_local(fs) or not os.path.isdir(root):
        return []
    removed = []
    for folder, _, files in os.walk(root):
        for name in files:
            if is_unfinished_write(name):
                path = os.path.join(folder, name)
                try:
                    os.remove(path)
                except FileNotFoundError:
                    continue
                removed.append(path)
    if removed:
        log.warning("removed %d unfinished write(s) of a killed process under %s",
                    len(removed), folder_uri)
    return removed


def remove(uri: str) -> None:
    """Delete a file or a whole folder/prefix; nothing happens when it does not exist."""
    fs, path = filesystem(uri)
    try:
        if hasattr(fs, "invalidate_cache"):
            fs.invalidate_cache(path)
        if fs.isdir(path):
            fs.rm(path, recursive=True)
        elif fs.exists(path):
            fs.rm(path)
    except FileNotFoundError:
        pass


def write_commit_marker(dir_uri: str, files: list[str], metadata: dict | None = None) -> dict:
    """Write `{dir_uri}/_COMMITTED.json` listing `files` (paths relative to `dir_uri`) with
    their size and sha256, read back from storage. Call it last: the folder's content
    counts as done only once the marker exists."""
    entries = []
    for rel in sorted(set(files)):
        if rel == COMMIT_MARKER:
            continue
        data = read_bytes(join(dir_uri, rel))
        entries.append({"path": rel, "size": len(data), "sha256": sha256_hex(data)})
    marker = {"format": COMMIT_FORMAT, **(metadata or {}), "files": entries}
    write_bytes(join(dir_uri, COMMIT_MARKER),
                json.dumps(marker, indent=2, sort_keys=True).encode("utf-8"))
    return marker


def read_commit_marker(dir_uri: str) -> dict | None:
    """The parsed commit marker of a folder, or None when it has none."""
    try:
        data = read_bytes(join(dir_uri, COMMIT_MARKER))
    except FileNotFoundError:
        return None
    try:
        marker = json.loads(data)
    except ValueError as exc:
        raise StorageError(f"commit marker {join(dir_uri, COMMIT_MARKER)} is not JSON: "
                           f"{exc}") from exc
    if not isinstance(marker, dict) or not isinstance(marker.get("files"), list):
        raise StorageError(f"commit marker {join(dir_uri, COMMIT_MARKER)} has no file list")
    return marker


def is_committed(dir_uri: str) -> bool:
    return exists(join(dir_uri, COMMIT_MARKER))


def verify_commit(dir_uri: str) -> list[str]:
    """Problems found comparing the marker's file list with storage ([] when all match)."""
    marker = read_commit_marker(dir_uri)
    if marker is None:
        return [f"{dir_uri}: no {COMMIT_MARKER}"]
    problems = []
    for entry in marker["files"]:
        uri = join(dir_uri, entry["path"])
        try:
            data = read_bytes(uri)
        except FileNotFoundError:
            problems.append(f"{uri}: listed in the commit marker but missing")
            continue
        if len(data) != entry["size"] or sha256_hex(data) != entry["sha256"]:
            problems.append(f"{uri}: size or sha256 differs from the commit marker")
    return problems
