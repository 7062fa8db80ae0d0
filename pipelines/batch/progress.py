"""The progress view of a batch: a tqdm bar on a terminal, log lines otherwise.

The bar counts finished stories (rendered, skipped, failed, invalid) against the listed
total once the listing is done, with shots, failures and shots per hour; in log mode one
line per finished story. It only reads events (`actors.batch_events`).
"""
from __future__ import annotations

import collections
import logging
import sys
import time

from actors.batch_events import (BatchEvent, ScriptInvalid, ShotRendered, StoryDone,
                                  StoryFailed, StoryRecordedBefore, StorySkipped)

log = logging.getLogger("storymem.batch")


class ProgressView:
    def __init__(self, run_id: str, mode: str = "auto"):
        from tqdm.auto import tqdm

        self.run_id = run_id
        self.started = time.time()
        use_bar = mode == "bar" or (mode == "auto" and sys.stderr.isatty())
        self.bar = tqdm(total=None, unit="story", desc=f"batch {run_id}",
                        disable=not use_bar, dynamic_ncols=True)
        self.counts: collections.Counter = collections.Counter()

    def listed(self, count: int, done: bool) -> None:
        """`count` items listed so far; `done`: the listing is complete (the bar's total)."""
        if not self.bar.disable:
            self.bar.total = count if done else None
            self.bar.refresh()

    def update(self, event: BatchEvent) -> None:
        finished = _finished_as(event)
        if finished is None and not isinstance(event, ShotRendered):
            return
        if finished is not None:
            self.counts[finished] += 1
        else:
            self.counts["shots"] += 1
        elapsed_h = max(time.time() - self.started, 1e-6) / 3600
        failed = self.counts["failed"] + self.counts["invalid"]
        if not self.bar.disable:
            if finished is not None:
                self.bar.update(1)
            self.bar.set_postfix({"shots": self.counts["shots"], "failed": failed,
                                  "shots/h": f"{self.counts['shots'] / elapsed_h:.0f}"},
                                 refresh=False)
        elif finished is not None:
            done = sum(v for k, v in self.counts.items() if k != "shots")
            log.info("batch %s: %d stories done (%d rendered, %d skipped, %d failed), "
                     "%d shots", self.run_id, done, self.counts["rendered"],
                     self.counts["skipped"], failed, self.counts["shots"])

    def close(self) -> None:
        self.bar.close()


def _finished_as(event: BatchEvent) -> str | None:
    if isinstance(event, (StoryDone, StoryRecordedBefore)):
        return event.status
    if isinstance(event, StorySkipped):
        return "skipped"
    if isinstance(event, StoryFailed):
        return "failed"
    if isinstance(event, ScriptInvalid):
        return "invalid"
    return None
