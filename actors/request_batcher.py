"""Micro-batching of requests inside one asyncio actor (max batch size, max wait).

Scorer actors are shared by every story worker of a batch. Each worker sends one request
per shot (all frames of the shot); this batcher groups requests that arrive close together
- from different stories - so the scorer's model runs full batches:

- requests are grouped per key (e.g. "embed_images"), in arrival order;
- a group is run as soon as it holds `max_batch_size` items (images, texts), or when its
  oldest request has waited `max_wait_s`; requests are never split, so a batch may hold a
  little more than `max_batch_size` items (the scorer actor then runs forwards of at most
  `max_batch_size`);
- with `expected_clients` (the number of story workers that send to this actor), a group
  also runs as soon as it holds a request from each of them: no one else can join, so
  waiting longer only adds latency (with one worker, requests never wait);
- one batch runs at a time, in a worker thread, so the event loop keeps accepting
  requests while the model computes; requests arriving during a run join the next batch.

Ray Serve's `@serve.batch` does the same but only inside a Serve replica (Ray 2.60 raises
outside one), so plain actors use this small class. It imports only the standard library.
"""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Sequence

# handler(key, payloads) -> one result per payload, run in a worker thread.
BatchHandler = Callable[[Hashable, Sequence[Any]], Sequence[Any]]


@dataclass
class _Request:
    payload: Any
    size: int
    future: asyncio.Future
    arrived: float
    client: Hashable | None = None


@dataclass
class _Group:
    requests: list = field(default_factory=list)
    size: int = 0
    timer: asyncio.TimerHandle | None = None


@dataclass
class BatchStats:
    """Counters over every batch served (aggregated; never one record per batch)."""

    batches: int = 0
    requests: int = 0
    items: int = 0
    max_requests_per_batch: int = 0
    max_items_per_batch: int = 0
    busy_s: float = 0.0
    queue_wait_s: float = 0.0
    failed_batches: int = 0
    requests_per_batch: collections.Counter = field(default_factory=collections.Counter)

    def __add__(self, other: "BatchStats") -> "BatchStats":
        """The counters of two groups together (e.g. one method's requests of every image
        size)."""
        return BatchStats(
            batches=self.batches + other.batches, requests=self.requests + other.requests,
            items=self.items + other.items,
            max_requests_per_batch=max(self.max_requests_per_batch,
                                       other.max_requests_per_batch),
            max_items_per_batch=max(self.max_items_per_batch, other.max_items_per_batch),
            busy_s=self.busy_s + other.busy_s, queue_wait_s=self.queue_wait_s + other.queue_wait_s,
            failed_batches=self.failed_batches + other.failed_batches,
            requests_per_batch=self.requests_per_batch + other.requests_per_batch)

    def as_dict(self) -> dict:
        batches = max(self.batches, 1)
        return {
            "batches": self.batches,
            "requests": self.requests,
            "items": self.items,
            "mean_requests_per_batch": self.requests / batches if self.batches else 0.0,
            "mean_items_per_batch": self.items / batches if self.batches else 0.0,
            "max_requests_per_batch": self.max_requests_per_batch,
            "max_items_per_batch": self.max_items_per_batch,
            "busy_s": self.busy_s,
            "mean_queue_wait_s": self.queue_wait_s / max(self.requests, 1),
            "failed_batches": self.failed_batches,
            "requests_per_batch_histogram": {
                str(k): v for k, v in sorted(self.requests_per_batch.items())},
        }


class RequestBatcher:
    """Groups `submit`ted requests per key and runs them through `handler` in batches."""

    def __init__(self, handler: BatchHandler, *, max_batch_size: int, max_wait_s: float,
                 expected_clients: int | None = None):
        if int(max_batch_size) < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size!r}")
        if float(max_wait_s) < 0:
            raise ValueError(f"max_wait_s must be >= 0, got {max_wait_s!r}")
        self._handler = handler
        self.max_batch_size = int(max_batch_size)
        self.max_wait_s = float(max_wait_s)
        self.expected_clients = _checked_clients(expected_clients)
        self._groups: dict[Hashable, _Group] = {}
        self._scheduled: set[Hashable] = set()
        self._lock: asyncio.Lock | None = None
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="batch-handler")
        self.stats: dict[Hashable, BatchStats] = collections.defaultdict(BatchStats)

    async def submit(self, key: Hashable, payload: Any, size: int = 1,
                     client: Hashable | None = None) -> Any:
        """Queue one request of `size` items; returns its own result once its batch ran.
        `client` names the sender (a story worker); None counts as nobody for the
        every-client-is-waiting rule."""
        loop = asyncio.get_running_loop()
        if self._lock is None:
            self._lock = asyncio.Lock()
        request = _Request(payload, max(int(size), 1), loop.create_future(), time.monotonic(),
                           client)
        group = self._groups.setdefault(key, _Group())
        group.requests.append(request)
        group.size += request.size
        if group.size >= self.max_batch_size or self._all_clients_waiting(group):
            self._schedule(key)
        elif group.timer is None:
            group.timer = loop.call_later(self.max_wait_s, self._schedule, key)
        return await request.future

    def set_expected_clients(self, expected_clients: int | None) -> None:
        """Change how many clients send here (a worker is gone for good): groups that now
        hold a request from every expected client run at once."""
        self.expected_clients = _checked_clients(expected_clients)
        for key, group in list(self._groups.items()):
            if self._all_clients_waiting(group):
                self._schedule(key)

    def _all_clients_waiting(self, group: _Group) -> bool:
        if self.expected_clients is None:
            return False
        clients = {r.client for r in group.requests if r.client is not None}
        return len(clients) >= self.expected_clients

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _schedule(self, key: Hashable) -> None:
        if key in self._scheduled or key not in self._groups:
            return
        self._scheduled.add(key)
        asyncio.ensure_future(self._run(key))

    def _take(self, key: Hashable) -> list[_Request]:
        """Remove requests in arrival order until they hold max_batch_size items (the last
        one may go past it: requests are never split, the handler runs forwards of at most
        max_batch_size items)."""
        group = self._groups.pop(key)
        if group.timer is not None:
            group.timer.cancel()
        taken, size = [], 0
        while group.requests and size < self.max_batch_size:
            request = group.requests.pop(0)
            taken.append(request)
            size += request.size
        if group.requests:  # the rest starts a new group that keeps its oldest deadline
            rest = _Group(requests=group.requests, size=sum(r.size for r in group.requests))
            self._groups[key] = rest
            loop = asyncio.get_running_loop()
            waited = time.monotonic() - rest.requests[0].arrived
            if (rest.size >= self.max_batch_size or waited >= self.max_wait_s
                    or self._all_clients_waiting(rest)):
                loop.call_soon(self._schedule, key)
            else:
                rest.timer = loop.call_later(self.max_wait_s - waited, self._schedule, key)
        return taken

    async def _run(self, key: Hashable) -> None:
        assert self._lock is not None
        async with self._lock:
            self._scheduled.discard(key)
            if key not in self._groups:
                return
            requests = self._take(key)
            started = time.monotonic()
            stats = self.stats[key]
            loop = asyncio.get_running_loop()
            try:
                results = await loop.run_in_executor(
                    self._executor, self._handler, key, [r.payload for r in requests])
                if len(results) != len(requests):
                    raise RuntimeError(
                        f"batch handler for {key!r} returned {len(results)} results "
                        f"for {len(requests)} requests")
            except Exception as exc:  # every request of the batch gets the error
                stats.failed_batches += 1
                for request in requests:
                    if not request.future.done():
                        request.future.set_exception(exc)
                return
            finally:
                stats.busy_s += time.monotonic() - started
            items = sum(r.size for r in requests)
            stats.batches += 1
            stats.requests += len(requests)
            stats.items += items
            stats.max_requests_per_batch = max(stats.max_requests_per_batch, len(requests))
            stats.max_items_per_batch = max(stats.max_items_per_batch, items)
            stats.requests_per_batch[len(requests)] += 1
            stats.queue_wait_s += sum(started - r.arrived for r in requests)
            for request, result in zip(requests, results):
                if not request.future.done():
                    request.future.set_result(result)


def _checked_clients(expected_clients: int | None) -> int | None:
    if expected_clients is not None and int(expected_clients) < 1:
        raise ValueError(f"expected_clients must be >= 1 or None, got {expected_clients!r}")
    return None if expected_clients is None else int(expected_clients)
