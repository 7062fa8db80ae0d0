"""Leases in storage: one holder at a time for a key, renewed while the holder lives.

A lease is a small JSON object at a URI:

    {"owner": "...", "token": "<uuid>", "acquired_at": t, "renewed_at": t, "expires_at": t}

- S3: put-if-absent (`If-None-Match: *`) creates it; renewals and the take-over of an
  expired lease are compare-and-swap on the ETag (`If-Match`), release is a conditional
  delete. Two contenders can never both win.
- Local paths: the read-check-write happens under `fcntl.flock` on a guard file beside the
  lease object; the object itself is written atomically.

The holder renews from a background thread every `ttl_s / 3` seconds; a holder that died
stops renewing and its lease expires after `ttl_s`, then the next contender takes over. A
holder whose lease is taken over (it stalled past `ttl_s`) learns it at its next renewal:
`lost` becomes true and `on_lost()` is called, so the work the lease guards can stop.

Used for an output folder (`output_lock`: `{out}/_locks/{name}.json`, taken by `storymem
render`, `storymem batch` and the flows), for Serve story-job claims and for one shot at a
time per Serve session.
"""
from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass

from fsspec.asyn import sync

from storymem_model import storage

log = logging.getLogger(__name__)


class LeaseHeldError(RuntimeError):
    """The key is leased by another live holder; names it and when its lease ends."""

    def __init__(self, uri: str, holder: dict, what: str = "lease"):
        self.uri = uri
        self.holder = holder
        remaining = max(0.0, float(holder.get("expires_at", 0)) - time.time())
        since = time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(holder.get('acquired_at', 0)))
        super().__init__(
            f"{what}: {uri} is held by {holder.get('owner')!r} since {since} UTC (lease ends "
            f"in {remaining:.0f} s unless renewed); wait for that holder to finish, or delete "
            f"the lease object if you are sure it is gone")


class LeaseLostError(RuntimeError):
    """The lease was taken over by another holder (this one stopped renewing in time)."""


@dataclass
class _Snapshot:
    record: dict | None
    version: str | None  # S3 ETag; None for local files


def default_owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class Lease:
    """`with Lease(uri, owner="worker 3"):` - exclusive use of what `uri` names.

    wait_s: how long `acquire` waits for a live holder (then LeaseHeldError).
    on_lost: called (from the renewal thread) when the lease was taken over.
    token: take a lease another holder handed over (`hand_over()`) under this token.

    Subclasses may add fields to the record (`record_fields`) and take over a live-looking
    holder they can prove gone (`can_take_over`)."""

    held_error = LeaseHeldError
    what = "lease"

    def __init__(self, uri: str, owner: str | None = None, ttl_s: float = 900.0,
                 wait_s: float = 0.0, poll_s: float = 5.0, on_lost=None,
                 token: str | None = None):
        if ttl_s <= 0:
            raise ValueError(f"lease ttl_s must be positive, got {ttl_s}")
        self.uri = uri
        self.on_lost = on_lost
        self.owner = owner or default_owner()
        self.ttl_s = float(ttl_s)
        self.wait_s = float(wait_s)
        self.poll_s = float(poll_s)
        self.token = token or uuid.uuid4().hex
        self._handed_over = False
        self._fs, self._path = storage.filesystem(self.uri)
        self._local = storage._is_local(self._fs)
        self._version: str | None = None
        self._acquired_at: float | None = None  # of the record this holder last wrote anew
        self._held = False
        self._lost = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._mutex = threading.Lock()

    # -- public -----------------------------------------------------------------------
    @property
    def held(self) -> bool:
        return self._held and not self._lost

    @property
    def lost(self) -> bool:
        return self._lost

    def try_acquire(self) -> bool:
        """Take the lease now if nobody else holds it; False (nothing raised) otherwise."""
        try:
            self.acquire()
        except LeaseHeldError:
            return False
        return True

    def acquire(self) -> "Lease":
        deadline = time.monotonic() + self.wait_s
        while True:
            holder = self._try_acquire()
            if holder is None:
                break
            if time.monotonic() >= deadline:
                raise self.held_error(self.uri, holder, self.what)
            time.sleep(min(self.poll_s, max(0.0, deadline - time.monotonic())) or 0.01)
        self._held = True
        self._lost = False
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._renew_loop, name=f"lease:{self.uri}", daemon=True)
        self._thread.start()
        log.info("acquired %s as %s", self.uri, self.owner)
        return self

    def ticket(self) -> "LeaseTicket":
        """What another process needs to check that this lease is still held."""
        return LeaseTicket(self.uri, self.token)

    def renew(self) -> None:
        """Extend the lease now; raises LeaseLostError if another holder took it over."""
        with self._mutex:
            if not self._held:
                raise LeaseLostError(f"{self.uri} is not held by this holder")
            now = time.time()
            record = self._record(now, acquired_at=self._acquired_at)
            if self._local:
                with self._guard():
                    current = self._read_local()
                    if current is None or current.get("token") != self.token:
                        self._lost = True
                        raise LeaseLostError(f"lease on {self.uri} was taken over: {current}")
                    self._write_local(record)
            else:
                try:
                    self._version = self._s3_put(record, if_match=self._version)
                except _PreconditionFailed as exc:
                    self._lost = True
                    raise LeaseLostError(f"lease on {self.uri} was taken over") from exc

    def release(self) -> None:
        if self._handed_over:
            self._release_handed_over()
            return
        self._stop_renewing()
        with self._mutex:
            if not self._held:
                return
            self._held = False
            try:
                if self._local:
                    with self._guard():
                        current = self._read_local()
                        if current is not None and current.get("token") == self.token:
                            os.remove(self._path)
                else:
                    self._s3_delete(if_match=self._version)
            except _PreconditionFailed:
                log.warning("lease on %s was taken over before release", self.uri)
            except FileNotFoundError:
                pass
            log.info("released %s", self.uri)

    def __enter__(self) -> "Lease":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    # -- hooks ----------------------------------------------------------------------------
    def record_fields(self) -> dict:
        """Extra fields of this holder's record (e.g. its process)."""
        return {}

    def can_take_over(self, holder: dict) -> bool:
        """Whether a holder whose lease has not expired may be taken over anyway (it is
        provably gone). Default: never."""
        return False

    # -- hand-over ----------------------------------------------------------------------------
    def hand_over(self) -> str:
        """Stop renewing and leave the lease for the process that continues the work;
        returns the token it takes the lease with (`Lease(..., token=token)`). Raises
        LeaseLostError if the lease was already lost."""
        if self.lost:
            raise LeaseLostError(f"the lease {self.uri} was lost before it could be handed "
                                 f"over")
        if not self.held:
            raise RuntimeError(f"{self.uri} is not held by this holder; nothing to hand over")
        self._stop_renewing()
        with self._mutex:
            self._held = False
            self._handed_over = True
        log.info("handed %s over (token %s...)", self.uri, self.token[:8])
        return self.token

    def _stop_renewing(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    def _release_handed_over(self) -> None:
        """After a hand-over: remove the lease only if it is still exactly ours (nobody took
        it over, e.g. the next process never started); leave it otherwise."""
        self._handed_over = False
        with self._mutex:
            try:
                if self._local:
                    with self._guard():
                        if self._is_own_record(self._read_local()):
                            os.remove(self._path)
                            log.info("released %s (never taken over)", self.uri)
                    return
                snapshot = self._s3_get()
                if self._is_own_record(snapshot.record):
                    self._s3_delete(if_match=snapshot.version)
                    log.info("released %s (never taken over)", self.uri)
            except (_PreconditionFailed, FileNotFoundError):
                pass

    def _is_own_record(self, record: dict | None) -> bool:
        return record is not None and record.get("token") == self.token and \
            record.get("acquired_at") == self._acquired_at

    # -- acquisition ----------------------------------------------------------------------
    def _new_record(self) -> dict:
        """A record acquired now (remembered, so renewals keep its `acquired_at`)."""
        self._acquired_at = time.time()
        return self._record(self._acquired_at)

    def _record(self, now: float, acquired_at: float | None = None) -> dict:
        return {"owner": self.owner, "token": self.token,
                "acquired_at": acquired_at if acquired_at is not None else now,
                "renewed_at": now, "expires_at": now + self.ttl_s, "ttl_s": self.ttl_s,
                **self.record_fields()}

    def _try_acquire(self) -> dict | None:
        """None when acquired, else the live holder's record (a holder with our token - a
        handed-over lease - or one `can_take_over` proves gone is replaced)."""
        holder = self._try_acquire_unexpired()
        if holder is None:
            return None
        adopting = holder.get("token") == self.token
        if adopting or self.can_take_over(holder):
            if self._replace(holder):
                if not adopting:
                    log.warning("took over %s from %r: it is gone", self.uri,
                                holder.get("owner"))
                return None
            return self._try_acquire_unexpired()  # someone else moved first: look again
        return holder

    def _replace(self, holder: dict) -> bool:
        """Write our record over exactly `holder`'s (compare and swap); False if the record
        changed meanwhile."""
        record = self._new_record()

        def same(current: dict | None) -> bool:
            return current is not None and all(
                current.get(k) == holder.get(k) for k in ("token", "acquired_at"))

        if self._local:
            with self._guard():
                if not same(self._read_local()):
                    return False
                self._write_local(record)
                return True
        snapshot = self._s3_get()
        if not same(snapshot.record):
            return False
        try:
            self._version = self._s3_put(record, if_match=snapshot.version)
        except (_PreconditionFailed, FileNotFoundError):
            return False
        return True

    def _try_acquire_unexpired(self) -> dict | None:
        """None when acquired (free, or expired and taken over), else the holder's record."""
        record = self._new_record()
        now = self._acquired_at
        if self._local:
            with self._guard():
                current = self._read_local()
                if current is not None and float(current.get("expires_at", 0)) > now:
                    return current
                if current is not None:
                    log.warning("taking over expired lease on %s from %r",
                                self.uri, current.get("owner"))
                self._write_local(record)
                return None
        try:
            self._version = self._s3_put(record, if_none_match=True)
            return None
        except FileExistsError:
            pass
        snapshot = self._s3_get()
        if snapshot.record is None:
            return self._try_acquire_again()
        if float(snapshot.record.get("expires_at", 0)) > now:
            return snapshot.record
        log.warning("taking over expired lease on %s from %r",
                    self.uri, snapshot.record.get("owner"))
        try:
            self._version = self._s3_put(record, if_match=snapshot.version)
            return None
        except (_PreconditionFailed, FileNotFoundError):
            return self._s3_get().record or {"owner": "unknown", "expires_at": now + 1}

    def _try_acquire_again(self) -> dict | None:
        try:
            self._version = self._s3_put(self._new_record(), if_none_match=True)
            return None
        except FileExistsError:
            return self._s3_get().record or {"owner": "unknown", "expires_at": time.time() + 1}

    def _renew_loop(self) -> None:
        interval = max(0.05, self.ttl_s / 3.0)
        while not self._stop.wait(interval):
            try:
                self.renew()
            except LeaseLostError as exc:
                log.error("%s", exc)
                if self.on_lost is not None:
                    self.on_lost()
                return
            except Exception as exc:  # transient storage trouble: try again next tick
                log.warning("could not renew lease on %s: %s", self.uri, exc)

    # -- local files ----------------------------------------------------------------------
    @contextlib.contextmanager
    def _guard(self):
        import fcntl

        os.makedirs(os.path.dirname(self._path) or ".", exist_ok=True)
        with open(self._path + ".guard", "a+") as handle:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)

    def _read_local(self) -> dict | None:
        try:
            with open(self._path, "rb") as handle:
                return json.loads(handle.read() or b"null")
        except FileNotFoundError:
            return None
        except json.JSONDecodeError:
            return {"owner": "unreadable lock object", "expires_at": 0}

    def _write_local(self, record: dict) -> None:
        storage.write_bytes(self._path, json.dumps(record).encode())

    # -- S3 -----------------------------------------------------------------------------------
    def _bucket_key(self) -> tuple[str, str]:
        bucket, key, _ = self._fs.split_path(self._path)
        return bucket, key

    def _s3_put(self, record: dict, if_none_match: bool = False,
                if_match: str | None = None) -> str:
        bucket, key = self._bucket_key()
        kwargs = {}
        if if_none_match:
            kwargs["IfNoneMatch"] = "*"
        if if_match is not None:
            kwargs["IfMatch"] = if_match
        try:
            response = self._fs.call_s3("put_object", Bucket=bucket, Key=key,
                                        Body=json.dumps(record).encode(), **kwargs)
        except FileExistsError:
            raise
        except OSError as exc:
            if _is_precondition_failure(exc):
                raise _PreconditionFailed(str(exc)) from exc
            raise
        return response["ETag"]

    def _s3_get(self) -> _Snapshot:
        bucket, key = self._bucket_key()

        async def _get():
            response = await self._fs._call_s3("get_object", Bucket=bucket, Key=key)
            async with response["Body"] as body:
                data = await body.read()
            return data, response["ETag"]

        try:
            data, etag = sync(self._fs.loop, _get)
        except FileNotFoundError:
            return _Snapshot(None, None)
        try:
            record = json.loads(data or b"null")
        except json.JSONDecodeError:
            record = {"owner": "unreadable lock object", "expires_at": 0}
        return _Snapshot(record, etag)

    def _s3_delete(self, if_match: str | None) -> None:
        bucket, key = self._bucket_key()
        kwargs = {"IfMatch": if_match} if if_match else {}
        try:
            self._fs.call_s3("delete_object", Bucket=bucket, Key=key, **kwargs)
        except OSError as exc:
            if _is_precondition_failure(exc):
                raise _PreconditionFailed(str(exc)) from exc
            raise
        self._fs.invalidate_cache(self._path)


class _PreconditionFailed(Exception):
    pass


def _is_precondition_failure(exc: OSError) -> bool:
    cause = exc.__cause__
    code = getattr(cause, "response", {}).get("Error", {}).get("Code") if cause else None
    return code in ("PreconditionFailed", "412") or (
        code is None and exc.errno == errno.EINVAL and "Precondition" in str(exc))


@dataclass(frozen=True)
class LeaseTicket:
    """A held lease as seen by processes that work under it without holding the `Lease`
    (e.g. the Ray Train workers of a flow's fit): `still_held()` reads the record and
    compares its token - a read, not a renewal (the holder renews). `Lease.ticket()`."""

    uri: str
    token: str

    def still_held(self) -> bool:
        """False once another holder took the lease over (or it is gone); True when the
        record cannot be read just now (the holder's own renewal finds a real loss)."""
        try:
            record = read_lease(self.uri)
        except (OSError, storage.StorageError, ValueError) as exc:
            log.warning("could not read lease %s: %s", self.uri, exc)
            return True
        return record is not None and record.get("token") == self.token

    def to_dict(self) -> dict:
        return {"uri": self.uri, "token": self.token}

    @classmethod
    def from_dict(cls, data: dict) -> "LeaseTicket":
        return cls(uri=str(data["uri"]), token=str(data["token"]))


def read_lease(uri: str) -> dict | None:
    """The current lease record at `uri`, or None (for status displays and tests)."""
    try:
        return json.loads(storage.read_bytes(uri))
    except FileNotFoundError:
        return None
