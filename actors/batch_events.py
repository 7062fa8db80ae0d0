"""The typed events of a batch run: what workers report and what the driver decides.

Every event is a frozen dataclass with a `kind` (an `EventKind`, also the first word of its
log line) and a `time` (seconds since the epoch, set where it happened). Story workers send
`StoryStarted`, `ShotRendered` and `WorkerLog` through the progress actor; the driver emits
the others. `pipelines.batch.run_batch(spec, on_event=...)` passes every one of them to
`on_event`, and writes each as a line of its worker's log (`describe()`).
"""
from __future__ import annotations

import dataclasses
import enum
import time
from dataclasses import dataclass, field
from typing import ClassVar

from storymem_model.records import ShotDone
from storymem_model.runner import describe_shot_done


class EventKind(enum.StrEnum):
    WORKER_READY = "worker_ready"
    WORKER_LOST = "worker_lost"
    WORKER_DIED = "worker_died"
    SCORER_REPLACED = "scorer_replaced"
    WORKER_LOG = "log"
    STORY_SUBMITTED = "story_submitted"
    STORY_STARTED = "story_started"
    SHOT_DONE = "shot_done"
    STORY_DONE = "story_done"
    STORY_RETRY = "story_retry"
    STORY_FAILED = "story_failed"
    STORY_SKIPPED = "story_skipped"
    STORY_RECORDED_BEFORE = "story_recorded_before"
    SCRIPT_INVALID = "script_invalid"


@dataclass(frozen=True, kw_only=True)
class BatchEvent:
    """Base of every batch event."""

    kind: ClassVar[EventKind]
    time: float = field(default_factory=time.time)

    @property
    def worker_name(self) -> str | None:
        """The worker whose log this event belongs to (None: the driver's)."""
        return getattr(self, "worker", None)

    def describe(self) -> str:
        """The event's log line: its kind, then its fields."""
        details = " ".join(f"{f.name}={getattr(self, f.name)}" for f in dataclasses.fields(self)
                           if f.name not in ("time", "worker", "pid"))
        return f"{self.kind.value}: {details}"


# -- sent by story workers -------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class StoryStarted(BatchEvent):
    kind: ClassVar[EventKind] = EventKind.STORY_STARTED
    worker: str
    pid: int
    story_id: str
    attempt: int
    shots_total: int


@dataclass(frozen=True, kw_only=True)
class ShotRendered(BatchEvent):
    """A worker finished (and checkpointed) one shot."""

    kind: ClassVar[EventKind] = EventKind.SHOT_DONE
    worker: str
    pid: int
    shot: ShotDone

    @property
    def story_id(self) -> str:
        return self.shot.story_id

    def describe(self) -> str:
        return f"{self.kind.value}: {describe_shot_done(self.shot)}"


@dataclass(frozen=True, kw_only=True)
class WorkerLog(BatchEvent):
    """One log line of a worker (also on the worker's stderr)."""

    kind: ClassVar[EventKind] = EventKind.WORKER_LOG
    worker: str
    pid: int
    level: str
    message: str

    def describe(self) -> str:
        return self.message


# -- emitted by the driver ------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class WorkerReady(BatchEvent):
    kind: ClassVar[EventKind] = EventKind.WORKER_READY
    worker: str
    pid: int
    load_s: float


@dataclass(frozen=True, kw_only=True)
class WorkerLost(BatchEvent):
    """A worker that could not start (or restart); it is replaced while replacements last."""

    kind: ClassVar[EventKind] = EventKind.WORKER_LOST
    worker: str
    reason: str


@dataclass(frozen=True, kw_only=True)
class WorkerDied(BatchEvent):
    """A worker died under a story (killed, crashed, or killed for the story timeout)."""

    kind: ClassVar[EventKind] = EventKind.WORKER_DIED
    worker: str
    story_id: str
    attempt: int


@dataclass(frozen=True, kw_only=True)
class ScorerReplaced(BatchEvent):
    """A scorer actor that died past its Ray restarts was replaced by a new actor under
    the same name (the workers' calls to it are sent again)."""

    kind: ClassVar[EventKind] = EventKind.SCORER_REPLACED
    actor: str
    reason: str


@dataclass(frozen=True, kw_only=True)
class StorySubmitted(BatchEvent):
    kind: ClassVar[EventKind] = EventKind.STORY_SUBMITTED
    worker: str
    story_id: str
    attempt: int


@dataclass(frozen=True, kw_only=True)
class StoryDone(BatchEvent):
    """A story is committed; status "rendered", or "skipped" when it already was."""

    kind: ClassVar[EventKind] = EventKind.STORY_DONE
    worker: str
    story_id: str
    status: str
    attempt: int
    shots_rendered: int


@dataclass(frozen=True, kw_only=True)
class StoryRetry(BatchEvent):
    kind: ClassVar[EventKind] = EventKind.STORY_RETRY
    story_id: str
    attempt: int
    error_type: str
    message: str


@dataclass(frozen=True, kw_only=True)
class StoryFailed(BatchEvent):
    """A story failed its last attempt; its error is in errors.parquet."""

    kind: ClassVar[EventKind] = EventKind.STORY_FAILED
    story_id: str
    attempts: int
    error_type: str
    message: str


@dataclass(frozen=True, kw_only=True)
class StorySkipped(BatchEvent):
    """A listed story that was committed before the run started."""

    kind: ClassVar[EventKind] = EventKind.STORY_SKIPPED
    story_id: str


@dataclass(frozen=True, kw_only=True)
class StoryRecordedBefore(BatchEvent):
    """A story whose outcome an earlier, interrupted invocation of the same run recorded."""

    kind: ClassVar[EventKind] = EventKind.STORY_RECORDED_BEFORE
    story_id: str
    status: str


@dataclass(frozen=True, kw_only=True)
class ScriptInvalid(BatchEvent):
    """A listed item that is no renderable story (see pipelines.story_planner)."""

    kind: ClassVar[EventKind] = EventKind.SCRIPT_INVALID
    source: str
    error_type: str
    message: str
