"""The output lock: a lease stored next to an output, so two runs never write it at once.

Why a storage lease and not a Prefect global concurrency limit: the lock lives where the
work lives, so it holds whatever Prefect server each run talks to (the temporary local
server of a laptop run, a deployment's server, a plain `storymem batch`), and it needs no
setup. The object is `{out}/_locks/{name}.json`; the lease mechanics (S3 conditional
writes, local flock, renewal, take-over of an expired lease) are `storymem_model.leases`.
"""
from __future__ import annotations

from storymem_model import storage
from storymem_model.leases import Lease, LeaseHeldError, LeaseLostError, default_owner, read_lease

LOCK_FOLDER = "_locks"

__all__ = ["LOCK_FOLDER", "LockLostError", "OutputLock", "OutputLockedError", "default_owner",
           "lock_uri", "read_lock"]


class OutputLockedError(LeaseHeldError):
    """The output is locked by another live run."""

    def __init__(self, uri: str, holder: dict, what: str = "output is locked by another run"):
        super().__init__(uri, holder, what)


LockLostError = LeaseLostError


def lock_uri(out_uri: str, name: str = "render") -> str:
    return storage.join(out_uri, LOCK_FOLDER, f"{name}.json")


class OutputLock(Lease):
    """`with OutputLock(out, owner="flow-run 1234"):` - exclusive use of `out` for a run."""

    held_error = OutputLockedError
    what = "output is locked by another run"

    def __init__(self, out_uri: str, name: str = "render", owner: str | None = None,
                 ttl_s: float = 900.0, wait_s: float = 0.0, poll_s: float = 5.0,
                 on_lost=None):
        super().__init__(lock_uri(out_uri, name), owner=owner, ttl_s=ttl_s, wait_s=wait_s,
                         poll_s=poll_s, on_lost=on_lost)


def read_lock(out_uri: str, name: str = "render") -> dict | None:
    """The current lock record of an output, or None (for status displays and tests)."""
    return read_lease(lock_uri(out_uri, name))


