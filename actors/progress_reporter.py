"""A tiny actor that collects progress events from every story worker for the driver.

Workers `report.remote(event)` without waiting (fire and forget); the driver `drain`s the
events every fraction of a second. Events are the small typed records of
`actors.batch_events` (worker, story, shot), never frames.
"""
from __future__ import annotations

import collections

MAX_EVENTS = 100_000  # a driver that stops draining cannot make this grow without bound


class ProgressReporter:
    def __init__(self):
        self._events: collections.deque = collections.deque(maxlen=MAX_EVENTS)
        self.dropped = 0

    def report(self, event) -> None:
        if len(self._events) == self._events.maxlen:
            self.dropped += 1
        self._events.append(event)

    def drain(self) -> list:
        events = list(self._events)
        self._events.clear()
        return events
