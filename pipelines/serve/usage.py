"""Per-key usage: one small record per API key, kept current under a storage lease.

    {root}/usage/{scope}.json          the record: active story jobs, sessions, stored bytes
    {root}/usage/_leases/{scope}.json  the lease every change of that record is made under

Quotas are checked and usage is changed in one step under the key's lease (S3 conditional
writes, a local flock: `storymem_model.leases.Lease`), so concurrent requests - on one
replica or on several - can never admit more than a quota allows. Nothing scans all jobs or
sessions per request: a request reads one record. The stored-bytes count grows as requests
write (the size of what they wrote) and is recounted exactly by the retention sweep.
"""
from __future__ import annotations

import json
import posixpath
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, TypeVar

from pipelines.serve.errors import ServeRequestError
from pipelines.serve.limits import MAX_RECORD_BYTES, ServeLimits
from storymem_model import storage
from storymem_model.leases import Lease, LeaseHeldError

T = TypeVar("T")
USAGE_DIR = "usage"
LEASE_TTL_S = 15.0
LEASE_WAIT_S = 20.0
LEASE_POLL_S = 0.05


@dataclass
class KeyUsage:
    """What one API key holds now."""

    scope: str
    active_jobs: dict[str, float] = field(default_factory=dict)  # job id -> admitted at
    sessions: dict[str, float] = field(default_factory=dict)     # session id -> created at
    stored_bytes: int = 0
    updated_at: float = 0.0

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> "KeyUsage":
        return cls(**json.loads(data))


def folder_bytes(uri: str) -> int:
    """Bytes of every file under `uri` (0 when there is none); one listing."""
    fs, path = storage.filesystem(uri)
    if hasattr(fs, "invalidate_cache"):
        fs.invalidate_cache(path)
    try:
        found = fs.find(path, detail=True)
    except FileNotFoundError:
        return 0
    return int(sum(info.get("size") or 0 for info in found.values()
                   if info.get("type", "file") == "file"))


def files_bytes(uris: list[str]) -> int:
    """Bytes of the files at `uris` (a missing one counts 0); one lookup each."""
    total = 0
    for uri in uris:
        fs, path = storage.filesystem(uri)
        if hasattr(fs, "invalidate_cache"):
            fs.invalidate_cache(path)
        try:
            total += int(fs.size(path) or 0)
        except FileNotFoundError:
            pass
    return total


class UsageIndex:
    """The usage records under `{root}/usage/`."""

    def __init__(self, root: str, owner: str):
        self.root = storage.join(root, USAGE_DIR)
        self.owner = owner
        self._local_locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()

    def uri(self, scope: str) -> str:
        return storage.join(self.root, f"{scope}.json")

    def read(self, scope: str) -> KeyUsage:
        try:
            return KeyUsage.from_json(storage.read_bytes(self.uri(scope),
                                                         max_bytes=MAX_RECORD_BYTES))
        except FileNotFoundError:
            return KeyUsage(scope=scope)

    def scopes(self) -> list[str]:
        """Every key that has a usage record (one listing of a folder with one object per
        key, not a scan of jobs)."""
        fs, path = storage.filesystem(self.root)
        if hasattr(fs, "invalidate_cache"):
            fs.invalidate_cache(path)
        try:
            names = fs.ls(path, detail=False)
        except FileNotFoundError:
            return []
        return sorted(posixpath.basename(n)[:-5] for n in names if n.endswith(".json"))

    def update(self, scope: str, change: Callable[[KeyUsage], T]) -> T:
        """Read the key's record, apply `change` (it may raise: then nothing is written),
        write it back - all under the key's lease."""
        with self._guard:
            local = self._local_locks.setdefault(scope, threading.Lock())
        with local:  # one contender per process; the lease settles it across replicas
            lease = Lease(storage.join(self.root, "_leases", f"{scope}.json"),
                          owner=self.owner, ttl_s=LEASE_TTL_S, wait_s=LEASE_WAIT_S,
                          poll_s=LEASE_POLL_S)
            try:
                lease.acquire()
            except LeaseHeldError:
                raise ServeRequestError(503, "usage_busy",
                                        "the server could not update this key's usage in "
                                        "time; retry shortly") from None
            try:
                usage = self.read(scope)
                result = change(usage)
                if lease.lost:
                    raise ServeRequestError(503, "usage_busy", "usage update interrupted; retry")
                usage.updated_at = time.time()
                storage.write_bytes(self.uri(scope), usage.to_json())
                return result
            finally:
                lease.release()

    # -- the changes the endpoint makes ----------------------------------------------------
    def check_storage(self, scope: str, limits: ServeLimits) -> None:
        """429 naming `max_stored_bytes_per_key` once the key's stored bytes are over it."""
        limits.check("max_stored_bytes_per_key", self.read(scope).stored_bytes,
                     "bytes stored for this API key")

    def admit_job(self, scope: str, job_id: str, limits: ServeLimits) -> None:
        def change(usage: KeyUsage) -> None:
            limits.check("max_active_jobs_per_key", len(usage.active_jobs) + 1,
                         "queued or running story jobs of this API key")
            limits.check("max_stored_bytes_per_key", usage.stored_bytes,
                         "bytes stored for this API key")
            usage.active_jobs[job_id] = time.time()
        self.update(scope, change)

    def end_job(self, scope: str, job_id: str, added_bytes: int = 0) -> None:
        def change(usage: KeyUsage) -> None:
            usage.active_jobs.pop(job_id, None)
            usage.stored_bytes = max(0, usage.stored_bytes + int(added_bytes))
        self.update(scope, change)

    def admit_session(self, scope: str, session_id: str, limits: ServeLimits) -> None:
        def change(usage: KeyUsage) -> None:
            limits.check("max_sessions_per_key", len(usage.sessions) + 1,
                         "stored sessions of this API key")
            limits.check("max_stored_bytes_per_key", usage.stored_bytes,
                         "bytes stored for this API key")
            usage.sessions[session_id] = time.time()
        self.update(scope, change)

    def end_session(self, scope: str, session_id: str, removed_bytes: int = 0) -> None:
        def change(usage: KeyUsage) -> None:
            usage.sessions.pop(session_id, None)
            usage.stored_bytes = max(0, usage.stored_bytes - int(removed_bytes))
        self.update(scope, change)

    def add_bytes(self, scope: str, added: int) -> None:
        if added:
            def change(usage: KeyUsage) -> None:
                usage.stored_bytes = max(0, usage.stored_bytes + int(added))
            self.update(scope, change)
