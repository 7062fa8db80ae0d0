"""Commit markers and listing on a local folder and on S3 (moto server)."""
from __future__ import annotations

import json
import os

import pytest

from storymem_model import storage


def _roundtrip(root: str) -> None:
    storage.write_bytes(storage.join(root, "shots/01_01.mp4"), b"video")
    storage.write_bytes(storage.join(root, "a.txt"), b"abc")
    assert storage.list_files(root) == ["a.txt", "shots/01_01.mp4"]
    assert not storage.is_committed(root)
    marker = storage.write_commit_marker(root, storage.list_files(root), {"story_id": "s"})
    assert storage.is_committed(root)
    assert marker["story_id"] == "s"
    assert [(f["path"], f["size"]) for f in marker["files"]] == [
        ("a.txt", 3), ("shots/01_01.mp4", 5)]
    assert marker["files"][0]["sha256"] == storage.sha256_hex(b"abc")
    assert storage.read_commit_marker(root) == marker
    assert storage.verify_commit(root) == []
    storage.write_bytes(storage.join(root, "a.txt"), b"abd")
    assert storage.verify_commit(root) == [
        f"{storage.join(root, 'a.txt')}: size or sha256 differs from the commit marker"]
    storage.remove(storage.join(root, "shots"))
    assert storage.list_files(root) == ["_COMMITTED.json", "a.txt"]
    assert any("missing" in p for p in storage.verify_commit(root))


def test_commit_marker_local(tmp_path):
    _roundtrip(str(tmp_path / "story"))
    assert storage.list_files(str(tmp_path / "nothing")) == []
    assert storage.read_commit_marker(str(tmp_path / "nothing")) is None


def test_commit_marker_s3(s3_bucket):
    _roundtrip(f"{s3_bucket}/out/story")


def test_local_writes_leave_no_temporary_files(tmp_path):
    target = tmp_path / "x" / "file.bin"
    storage.write_bytes(str(target), b"1" * 1000)
    storage.write_bytes(str(target), b"2")
    assert os.listdir(target.parent) == ["file.bin"]
    assert target.read_bytes() == b"2"


def test_broken_marker_is_an_error(tmp_path):
    storage.write_bytes(str(tmp_path / "_COMMITTED.json"), b"{not json")
    with pytest.raises(storage.StorageError, match="is not JSON"):
        storage.read_commit_marker(str(tmp_path))
    storage.write_bytes(str(tmp_path / "_COMMITTED.json"), json.dumps({"x": 1}).encode())
    with pytest.raises(storage.StorageError, match="has no file list"):
        storage.read_commit_marker(str(tmp_path))


def test_join_refuses_climbing_out_of_a_folder():
    from storymem_model.storage import StorageError, join

    assert join("s3://b/out", "runs", "r1") == "s3://b/out/runs/r1"
    for bad in ("..", "../x", "runs/../../etc", "a/../b"):
        with pytest.raises(StorageError, match="'..' is not allowed"):
            join("/data/out", bad)
    assert join("/data/out", "a..b", "..c") == "/data/out/a..b/..c"  # only whole segments


def test_a_failed_local_write_leaves_no_temporary_file(tmp_path, monkeypatch):
    import os as os_module

    from storymem_model import storage

    target = tmp_path / "folder" / "file.bin"

    def failing_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(storage.os, "replace", failing_replace)
    with pytest.raises(OSError, match="No space left"):
        storage.write_bytes(str(target), b"data")
    assert os_module.listdir(target.parent) == []  # no ".file.bin.<hex>.tmp" left behind
    monkeypatch.undo()
    storage.write_bytes(str(target), b"data")
    assert target.read_bytes() == b"data"


def test_a_local_write_syncs_the_file_then_its_folder_after_the_rename(tmp_path, monkeypatch):
    """The data reaches the disk before the rename, and the folder entry after it (so a
    power loss leaves the old file or the new one, never an empty one)."""
    import os as os_module

    from storymem_model import storage

    target = tmp_path / "folder" / "file.bin"
    events = []
    real_fsync, real_replace = os_module.fsync, os_module.replace

    def fsync(fd):
        path = os_module.readlink(f"/proc/self/fd/{fd}")
        events.append(("fsync", "folder" if os_module.path.isdir(path) else "file"))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", os_module.path.basename(dst)))
        return real_replace(src, dst)

    monkeypatch.setattr(storage.os, "fsync", fsync)
    monkeypatch.setattr(storage.os, "replace", replace)
    storage.write_bytes(str(target), b"data")
    assert events == [("fsync", "file"), ("replace", "file.bin"), ("fsync", "folder")]
    assert target.read_bytes() == b"data"
