"""The stories a batch still has to render, in order: retries first, then the listing.

`StoryFeed` reads the script planner's items (`pipelines.story_planner.plan_items`) lazily,
one when a worker is free. On the way it records what needs no worker, the moment it is
known: invalid items (an error row, stage "listing"), stories committed before the run (a
"skipped" story row), and it passes over stories whose outcome an earlier invocation of
the same run id recorded.
"""
from __future__ import annotations

import collections
import logging
from typing import Callable, Iterator

from actors.batch_events import (BatchEvent, ScriptInvalid, StoryRecordedBefore,
                                 StorySkipped)
from pipelines.batch.recorder import RunRecorder
from pipelines.batch.slots import StoryTask
from pipelines.run_tables import ErrorRow, StoryRow
from pipelines.story_planner import InvalidScript, PlannedStory, PlanStatus
from storymem_model import storage

log = logging.getLogger("storymem.batch")


class StoryFeed:
    def __init__(self, items: Iterator[PlannedStory | InvalidScript], recorder: RunRecorder,
                 emit: Callable[[BatchEvent], None], *, config_hash: str,
                 consistency: bool = False):
        self._items = items
        self._config_hash = config_hash
        self._recorder = recorder
        self._emit = emit
        self._consistency = consistency
        self._retries: collections.deque[StoryTask] = collections.deque()
        self.listed = 0
        self.listing_done = False

    @property
    def exhausted(self) -> bool:
        return self.listing_done and not self._retries

    def retry(self, task: StoryTask) -> None:
        """`task` goes before any new story."""
        self._retries.appendleft(task)

    def next(self) -> StoryTask | None:
        """The next story to send to a worker; None when there is none right now."""
        if self._retries:
            return self._retries.popleft()
        while not self.listing_done:
            try:
                item = next(self._items)
            except StopIteration:
                self.listing_done = True
                return None
            self.listed += 1
            if isinstance(item, InvalidScript):
                self._invalid(item)
                continue
            known = self._recorder.recorded_story(item.position, item.story_id)
            if known is not None:
                self._emit(StoryRecordedBefore(story_id=item.story_id, status=known.status))
                continue
            if item.status == PlanStatus.COMMITTED.value:
                self._skipped(item)
                continue
            return StoryTask(item)
        return None

    def _invalid(self, item: InvalidScript) -> None:
        log.error("%s", item.message)
        self._recorder.record_error(ErrorRow.listing(self._recorder.run_id, item))
        self._emit(ScriptInvalid(source=item.source, error_type=item.error_type,
                                 message=item.message))

    def _skipped(self, item: PlannedStory) -> None:
        storage.remove_unfinished_writes(item.story_uri)  # a killed attempt's, before the commit
        self._recorder.record_story(StoryRow.skipped(self._recorder.run_id, item,
                                                     self._config_hash))
        if self._consistency:
            log.info("story %s is already committed: no consistency computed", item.story_id)
        self._emit(StorySkipped(story_id=item.story_id))

