"""Retention: what the endpoint stores is deleted once it is older than its kind's TTL.

    shots     a single shot's folder, `shots_ttl_s` after it was written
    sessions  a session, `sessions_ttl_s` after its last change (a session whose shot is
              rendering - its shot lease held - is never removed)
    jobs      a finished story job (succeeded or failed) with its outputs, `jobs_ttl_s`
              after it finished; queued and running jobs are never removed

The sweep runs without a person: every generation replica checks every `cleanup_every_s`
whether a sweep is due (`maintenance/last-sweep.json`) and runs it only while holding the
cleanup lease (`maintenance/cleanup-lease.json`), so one replica sweeps at a time. It lists
each kind once (one recursive listing, sizes and times included), deletes what expired,
takes deleted sessions and jobs off the keys' usage records and recounts every key's
stored bytes exactly (the per-request counts in between are increments).
"""
from __future__ import annotations

import datetime
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Callable

from pipelines.serve.jobs import JobRegistry
from pipelines.serve.limits import MAX_RECORD_BYTES
from pipelines.serve.sessions import SessionStore
from pipelines.serve.usage import KeyUsage, UsageIndex
from storymem_model import storage
from storymem_model.leases import Lease
from storymem_model.spec_json import Spec, check_number

log = logging.getLogger("storymem.serve.retention")

DAY_S = 86_400.0
KINDS = ("shots", "sessions", "jobs")
MAINTENANCE_DIR = "maintenance"
CLEANUP_LEASE_TTL_S = 120.0
ORPHAN_GRACE_S = 3600.0  # a usage entry with nothing stored behind it is dropped after this


@dataclass(frozen=True)
class RetentionPolicy(Spec):
    """How long each kind of stored item is kept, and how often the sweep runs (seconds)."""

    shots_ttl_s: float = 7 * DAY_S
    sessions_ttl_s: float = 7 * DAY_S
    jobs_ttl_s: float = 30 * DAY_S
    cleanup_every_s: float = 600.0

    def problems(self) -> list[str]:
        out: list[str] = []
        for name in ("shots_ttl_s", "sessions_ttl_s", "jobs_ttl_s", "cleanup_every_s"):
            check_number(out, name, getattr(self, name), above=0)
        return out

    def ttl_s(self, kind: str) -> float:
        return getattr(self, f"{kind}_ttl_s")


@dataclass
class StoredItem:
    """One shot, session or job folder: its files' total size and newest change."""

    kind: str
    scope: str
    item_id: str
    bytes: int = 0
    modified: float = 0.0
    files: list[str] = field(default_factory=list)


@dataclass
class SweepReport:
    deleted: dict[str, list[str]] = field(default_factory=lambda: {k: [] for k in KINDS})
    kept: dict[str, int] = field(default_factory=lambda: {k: 0 for k in KINDS})
    stored_bytes: dict[str, int] = field(default_factory=dict)  # scope -> bytes after

    def as_dict(self) -> dict:
        return {"deleted": {k: len(v) for k, v in self.deleted.items()}, "kept": self.kept,
                "stored_bytes": self.stored_bytes}


def _modified(info: dict) -> float:
    value = info.get("mtime", info.get("LastModified", info.get("last_modified")))
    if isinstance(value, datetime.datetime):
        return value.timestamp()
    try:
        return float(value)
    except (TypeError, ValueError):
        return time.time()  # unknown: treat as new, never delete on a guess


def list_items(root: str, kind: str) -> dict[tuple[str, str], StoredItem]:
    """Every `{kind}/{scope}/{id}/` folder under `root`, from one recursive listing."""
    fs, base = storage.filesystem(storage.join(root, kind))
    if hasattr(fs, "invalidate_cache"):
        fs.invalidate_cache(base)
    try:
        found = fs.find(base, detail=True)
    except FileNotFoundError:
        return {}
    items: dict[tuple[str, str], StoredItem] = {}
    base = base.rstrip("/")
    for path, info in found.items():
        if info.get("type", "file") != "file" or not path.startswith(base + "/"):
            continue
        parts = path[len(base) + 1:].split("/")
        if len(parts) < 3:
            continue
        item = items.setdefault((parts[0], parts[1]), StoredItem(kind, parts[0], parts[1]))
        item.bytes += int(info.get("size") or 0)
        item.modified = max(item.modified, _modified(info))
        item.files.append("/".join(parts[2:]))
    return items


def sweep(root: str, policy: RetentionPolicy, usage: UsageIndex, owner: str,
          now: float | None = None, should_stop: Callable[[], bool] = lambda: False
          ) -> SweepReport:
    """Delete what expired, retire it from the usage records, recount stored bytes."""
    now = time.time() if now is None else now
    report = SweepReport()
    sessions = SessionStore(root)
    jobs = JobRegistry(root)
    remaining: dict[str, int] = {}
    gone: dict[str, dict[str, list[str]]] = {}  # scope -> {"sessions": [...], "jobs": [...]}
    for kind in KINDS:
        ttl = policy.ttl_s(kind)
        for (scope, item_id), item in sorted(list_items(root, kind).items()):
            if should_stop():
                return report
            deleted = False
            if now - item.modified > ttl:
                try:
                    deleted = _delete(kind, item, root, sessions, jobs, owner, now, ttl)
                except Exception:
                    log.exception("retention: could not delete %s %s/%s; kept", kind, scope,
                                  item_id)
            if deleted:
                report.deleted[kind].append(f"{scope}/{item_id}")
                gone.setdefault(scope, {"sessions": [], "jobs": []})
                if kind in ("sessions", "jobs"):
                    gone[scope][kind].append(item_id)
            else:
                report.kept[kind] += 1
                remaining[scope] = remaining.get(scope, 0) + item.bytes
    for scope in sorted(set(usage.scopes()) | set(remaining) | set(gone)):
        if should_stop():
            return report
        retired = gone.get(scope, {"sessions": [], "jobs": []})
        stored = remaining.get(scope, 0)

        def change(record: KeyUsage, retired=retired, stored=stored, scope=scope) -> None:
            for session_id in retired["sessions"]:
                record.sessions.pop(session_id, None)
            for job_id in retired["jobs"]:
                record.active_jobs.pop(job_id, None)
            for session_id, created in list(record.sessions.items()):
                if now - created > ORPHAN_GRACE_S and not storage.exists(
                        storage.join(sessions.session_uri(scope, session_id), "session.json")):
                    record.sessions.pop(session_id)
            record.stored_bytes = stored
        try:
            usage.update(scope, change)
            report.stored_bytes[scope] = stored
        except Exception:
            log.exception("retention: could not update the usage record of a key")
    return report


def _delete(kind: str, item: StoredItem, root: str, sessions: SessionStore, jobs: JobRegistry,
            owner: str, now: float, ttl: float) -> bool:
    folder = storage.join(root, kind, item.scope, item.item_id)
    if kind == "shots":
        storage.remove(folder)
        return True
    if kind == "jobs":
        try:
            job = jobs.get(item.scope, item.item_id)
        except Exception:
            job = None
        if job is not None and (job.status.active or now - job.updated_at <= ttl):
            return False  # queued or running jobs stay; finished ones count from the end
        storage.remove(folder)
        return True
    # a session: only while no shot of it renders
    lease = Lease(sessions.shot_lease_uri(item.scope, item.item_id), owner=owner, ttl_s=60.0)
    if not lease.try_acquire():
        return False
    try:
        storage.remove(storage.join(folder, "session.json"))  # gone for every replica now
        for rel in item.files:
            if not rel.startswith("shot-lease.json"):
                storage.remove(storage.join(folder, rel))
    finally:
        try:
            lease.release()
        except Exception:
            pass
    storage.remove(folder)
    return True


class RetentionSchedule:
    """When this replica should sweep, and the sweep under the cleanup lease."""

    def __init__(self, root: str, policy: RetentionPolicy, usage: UsageIndex, owner: str):
        self.root = root
        self.policy = policy
        self.usage = usage
        self.owner = owner
        self.marker = storage.join(root, MAINTENANCE_DIR, "last-sweep.json")
        self.lease_uri = storage.join(root, MAINTENANCE_DIR, "cleanup-lease.json")

    def last_sweep(self) -> float:
        try:
            return float(json.loads(storage.read_bytes(
                self.marker, max_bytes=MAX_RECORD_BYTES))["finished_at"])
        except (FileNotFoundError, ValueError, KeyError, TypeError):
            return 0.0

    def run_if_due(self, now: float | None = None) -> SweepReport | None:
        """Sweep when the last sweep (by any replica) is `cleanup_every_s` old and no other
        replica is sweeping; None when nothing was done. Blocking."""
        now = time.time() if now is None else now
        if now - self.last_sweep() < self.policy.cleanup_every_s:
            return None
        lease = Lease(self.lease_uri, owner=self.owner, ttl_s=CLEANUP_LEASE_TTL_S)
        if not lease.try_acquire():
            return None
        try:
            if now - self.last_sweep() < self.policy.cleanup_every_s:
                return None  # another replica swept while this one waited
            started = time.time()
            report = sweep(self.root, self.policy, self.usage, self.owner,
                           should_stop=lambda: lease.lost)
            storage.write_bytes(self.marker, json.dumps({
                "started_at": started, "finished_at": time.time(), "owner": self.owner,
                **report.as_dict()}, sort_keys=True).encode())
            log.info("retention sweep: %s", report.as_dict())
            return report
        finally:
            lease.release()
