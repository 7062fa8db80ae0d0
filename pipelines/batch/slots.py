"""The bookkeeping of a supervised worker pool, without Ray: slots, stories, attempts.

A `WorkerSlot` is one place for a story worker; the actor in it may die and be restarted
by Ray (same slot, same name) or replaced by the driver (same slot, a new incarnation
named `...-worker-{index}.{generation}`). A `StoryTask` is one story on its way through
attempts. `SlotTable` holds the slots and decides, from plain values and a clock reading:
which slots are free, which story overstayed its timeout, whether a lost worker may be
replaced, whether the pool is still alive. `pipelines.batch.worker_pool` does the Ray side.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

from pipelines.story_planner import PlannedStory


class SlotState(enum.StrEnum):
    STARTING = "starting"  # actor created, model loading
    IDLE = "idle"  # ready for a story
    BUSY = "busy"  # rendering `task`
    RECOVERING = "recovering"  # died under a story; Ray restarts it, waiting for its ping
    GONE = "gone"  # lost for good (replacements used up)


@dataclass
class StoryTask:
    """A listed, valid story and its attempts so far."""

    story: PlannedStory  # with its script
    attempts: int = 0
    started: float = 0.0  # clock reading when the current attempt was submitted

    @property
    def story_id(self) -> str:
        return self.story.story_id

    def can_retry(self, max_attempts: int) -> bool:
        return self.attempts < max_attempts


@dataclass
class WorkerSlot:
    index: int
    name: str
    generation: int = 0
    state: SlotState = SlotState.STARTING
    task: StoryTask | None = None
    handle: Any = None  # the Ray actor handle
    pid: int | None = None
    timed_out: bool = False  # the driver killed it for the story timeout


class SlotTable:
    """The slots of one run and the decisions about them."""

    def __init__(self, run_id: str, workers: int, replacement_limit: int):
        self.run_id = run_id
        self.replacement_limit = replacement_limit
        self.replacements = 0
        self.ever_ready = False
        self.slots = [WorkerSlot(i, self._name(i, 0)) for i in range(workers)]

    def _name(self, index: int, generation: int) -> str:
        return f"storymem-{self.run_id}-worker-{index}" + (f".{generation}" if generation else "")

    # -- states ----------------------------------------------------------------------
    def in_state(self, *states: SlotState) -> list[WorkerSlot]:
        return [s for s in self.slots if s.state in states]

    def idle(self) -> list[WorkerSlot]:
        return self.in_state(SlotState.IDLE)

    def any_busy(self) -> bool:
        return bool(self.in_state(SlotState.BUSY))

    def any_alive(self) -> bool:
        return any(s.state is not SlotState.GONE for s in self.slots)

    def live_indices(self) -> list[int]:
        return [s.index for s in self.slots if s.state is not SlotState.GONE]

    # -- transitions -------------------------------------------------------------------
    def ready(self, slot: WorkerSlot, pid: int) -> None:
        slot.state, slot.pid = SlotState.IDLE, pid
        self.ever_ready = True

    def assign(self, slot: WorkerSlot, task: StoryTask, now: float) -> None:
        """`task` goes to `slot` as its next attempt."""
        if slot.state is not SlotState.IDLE:
            raise RuntimeError(f"worker {slot.name} is {slot.state}, not idle")
        task.attempts += 1
        task.started = now
        slot.state, slot.task = SlotState.BUSY, task

    def release(self, slot: WorkerSlot, state: SlotState = SlotState.IDLE) -> StoryTask | None:
        """The slot's story came back (done, failed, or its worker died)."""
        task, slot.task = slot.task, None
        slot.state = state
        return task

    def overdue(self, now: float, timeout_s: float | None) -> list[WorkerSlot]:
        """Busy slots whose story has run longer than `timeout_s`, each reported once."""
        if timeout_s is None:
            return []
        late = [s for s in self.in_state(SlotState.BUSY)
                if s.task is not None and not s.timed_out and now - s.task.started > timeout_s]
        for slot in late:
            slot.timed_out = True
        return late

    def take_timeout(self, slot: WorkerSlot) -> bool:
        """Whether the slot's worker died because the driver killed it for the timeout
        (and clear the mark)."""
        was, slot.timed_out = slot.timed_out, False
        return was

    def replace(self, slot: WorkerSlot) -> bool:
        """A lost worker: True when it may be replaced (the slot becomes a new incarnation,
        STARTING), False when the replacements are used up (the slot is GONE)."""
        slot.task, slot.pid, slot.timed_out = None, None, False
        if self.replacements >= self.replacement_limit:
            slot.state, slot.handle = SlotState.GONE, None
            return False
        self.replacements += 1
        slot.generation += 1
        slot.name = self._name(slot.index, slot.generation)
        slot.state, slot.handle = SlotState.STARTING, None
        return True
