"""The output lock: a lease stored next to an output, so two runs never write it at once.

    {out}/_locks/{name}.json      (name "render" for story renders, "dataset", "train")

Who takes it: the process that writes. `storymem render` and the batch driver
(`run_batch`, hence `storymem batch` and the Ray job a flow submits) take
`OutputLock(out, "render")` for as long as they run; a flow takes it first (so a second
run is refused before it plans anything) and hands it to its batch (below).

Why a storage lease and not a Prefect global concurrency limit: the lock lives where the
work lives, so it holds whatever Prefect server each run talks to (the temporary local
server of a laptop run, a deployment's server, a plain `storymem batch`), and it needs no
setup. The lease mechanics are `storymem_model.leases` (S3 conditional writes, local
flock, renewal every ttl/3, take-over of an expired lease, `lost` once taken over, and
hand-over: the holder calls `hand_over()` and passes its token to the process that
continues the work, which takes the lease with `OutputLock(out, token=token)` - a flow hands
its lock to the batch it starts this way, in its own process or to a Ray job's driver
through the BatchSpec, so there is never a second lock to deadlock on nor a moment without
one). This module adds, for outputs, the holder's process in the record (host, boot id, pid
namespace, pid and its start time): a holder on this machine whose process is gone (a
killed render or batch driver) is taken over at once instead of after the TTL; a holder on
another machine, or one that cannot be told apart, keeps the lease until it expires.
"""
from __future__ import annotations

import os
import socket

from storymem_model import storage
from storymem_model.leases import Lease, LeaseHeldError, LeaseLostError, default_owner, read_lease

LOCK_FOLDER = "_locks"
DEFAULT_TTL_S = 900.0
POLL_S = 1.0  # how often a run waiting for the output lock looks again

__all__ = ["DEFAULT_TTL_S", "LOCK_FOLDER", "LockLostError", "OutputLock", "OutputLockedError",
           "POLL_S", "default_owner", "holder_is_gone", "lock_uri", "process_identity", "read_lock"]


class OutputLockedError(LeaseHeldError):
    """The output is locked by another live run."""

    def __init__(self, uri: str, holder: dict, what: str = "output is locked by another run"):
        super().__init__(uri, holder, what)


LockLostError = LeaseLostError


def lock_uri(out_uri: str, name: str = "render") -> str:
    return storage.join(out_uri, LOCK_FOLDER, f"{name}.json")


class OutputLock(Lease):
    """`with OutputLock(out, owner="storymem render ..."):` - exclusive use of `out`.

    token: take over the lease a holder handed over (`hand_over()`) under this token."""

    held_error = OutputLockedError
    what = "output is locked by another run"

    def __init__(self, out_uri: str, name: str = "render", owner: str | None = None,
                 ttl_s: float = DEFAULT_TTL_S, wait_s: float = 0.0, poll_s: float = POLL_S,
                 on_lost=None, token: str | None = None):
        super().__init__(lock_uri(out_uri, name), owner=owner, ttl_s=ttl_s, wait_s=wait_s,
                         poll_s=poll_s, on_lost=on_lost, token=token)
        self.out_uri = out_uri
        self.process = process_identity()

    def record_fields(self) -> dict:
        """The holder's process, so a holder on this machine that is gone is known."""
        return {"process": self.process}

    def can_take_over(self, holder: dict) -> bool:
        return holder_is_gone(holder)


def read_lock(out_uri: str, name: str = "render") -> dict | None:
    """The current lock record of an output, or None (for status displays and tests)."""
    return read_lease(lock_uri(out_uri, name))


# ---------------------------------------------------------------------------------------
def process_identity(pid: int | None = None) -> dict:
    """What tells a process apart on this machine: host name, boot id, pid namespace, pid
    and the process's start time (so a reused pid is not taken for the holder)."""
    pid = os.getpid() if pid is None else pid
    return {"host": socket.gethostname(), "boot_id": _read_text(
        "/proc/sys/kernel/random/boot_id"), "pid_ns": _pid_namespace(), "pid": pid,
        "started": _process_start(pid)}


def holder_is_gone(record: dict) -> bool:
    """True only when the holder's process provably no longer runs: it ran on this
    machine (same host name, boot and pid namespace) and its pid is gone or now belongs to
    a process started at another time. False whenever that cannot be told."""
    theirs = record.get("process")
    if not isinstance(theirs, dict):
        return False
    ours = process_identity()
    for key in ("host", "boot_id", "pid_ns"):
        if ours.get(key) is None or theirs.get(key) != ours[key]:
            return False
    pid, started = theirs.get("pid"), theirs.get("started")
    if not isinstance(pid, int) or started is None:
        return False
    now_started = _process_start(pid)
    return now_started is None or now_started != started


def _read_text(path: str) -> str | None:
    try:
        with open(path, encoding="ascii") as handle:
            return handle.read().strip() or None
    except OSError:
        return None


def _pid_namespace() -> str | None:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def _process_start(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (/proc/PID/stat field 22), or
    None when no such process runs (or there is no /proc)."""
    text = _read_text(f"/proc/{pid}/stat")
    if text is None:
        return None
    fields = text.rsplit(")", 1)[-1].split()
    try:
        if fields[0] == "Z":  # a zombie has exited
            return None
        return int(fields[19])
    except (IndexError, ValueError):
        return None
