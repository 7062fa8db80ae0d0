"""The story-job executor of one generation replica: its own threads, a bounded queue.

Story jobs never run on the event loop's default thread pool, which single shots, session
shots, session loading and adoption use: a replica with many jobs still answers those at
once. `job_workers` threads (default 1) run jobs one after another; at most
`max_queued_jobs` more wait. A job takes its place with `reserve(job_id)` before anything
is written for it - past the bound that raises `LimitExceeded("max_queued_jobs")`, a 429
`job_queue_full` - and `start(job_id, work)` hands it to the threads. The model calls of
a job and of interactive shots take turns per call (`SerializedPipeline`), so a shot waits
at most for the job's model call in progress.
"""
from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

from pipelines.serve.limits import QUEUE_LIMIT, LimitExceeded

log = logging.getLogger("storymem.serve.jobs")

_RESERVED, _QUEUED, _RUNNING = "reserved", "queued", "running"


class JobAlreadyHere(RuntimeError):
    """The job is already queued or running on this replica."""


class JobExecutor:
    def __init__(self, workers: int, max_queued: int):
        self.workers = int(workers)
        self.max_queued = int(max_queued)
        self._pool = ThreadPoolExecutor(max_workers=self.workers,
                                        thread_name_prefix="story-job")
        self._lock = threading.Lock()
        self._jobs: dict[str, str] = {}

    def reserve(self, job_id: str) -> None:
        """Take a place in the queue for `job_id`; LimitExceeded (429) when it is full."""
        with self._lock:
            if job_id in self._jobs:
                raise JobAlreadyHere(job_id)
            waiting = sum(1 for state in self._jobs.values() if state != _RUNNING)
            if waiting >= self.max_queued:
                raise LimitExceeded(QUEUE_LIMIT, self.max_queued, waiting + 1,
                                    "story jobs waiting on this server replica")
            self._jobs[job_id] = _RESERVED

    def cancel(self, job_id: str) -> None:
        """Give a reserved place back (the job was refused after all)."""
        with self._lock:
            if self._jobs.get(job_id) == _RESERVED:
                del self._jobs[job_id]

    def start(self, job_id: str, work: Callable[[], None]) -> None:
        """Queue a reserved job; `work()` runs on the job threads."""
        with self._lock:
            self._jobs[job_id] = _QUEUED

        def run() -> None:
            with self._lock:
                self._jobs[job_id] = _RUNNING
            try:
                work()
            except Exception:  # work() records its own failures; this is a last resort
                log.exception("story job %s: unexpected failure on the job thread", job_id)
            finally:
                with self._lock:
                    self._jobs.pop(job_id, None)

        self._pool.submit(run)

    def holds(self, job_id: str) -> bool:
        with self._lock:
            return job_id in self._jobs

    def counts(self) -> dict[str, int]:
        with self._lock:
            states = list(self._jobs.values())
        return {"running": states.count(_RUNNING),
                "queued": len(states) - states.count(_RUNNING)}

    def job_ids(self) -> list[str]:
        with self._lock:
            return sorted(self._jobs)
