"""The supervised pool of story worker actors: start, submit, collect, time out, replace.

`WorkerPool` owns the Ray side of the slots that `slots.SlotTable` keeps the books of:
it creates the `StoryWorker` actors (each gets the run's `RenderSpec`, its handles to the
scorer pools, the progress actor), sends a story to an idle slot, and turns whatever comes
back - a ping, a story outcome, a story error, a dead actor - into one typed `Completion`
for the driver. Ray restarts a crashed worker up to `worker_max_restarts` times (the pool
then pings it again); a worker that cannot come back is replaced in a new incarnation
while `BatchOptions.replacement_limit` allows. A story that overstays `story_timeout_s`
gets its worker killed (Ray restarts it), which fails the attempt as a story timeout.
"""
from __future__ import annotations

import enum
import re
import time
from dataclasses import dataclass
from typing import Union

from actors.story_outcome import StoryOutcome, WorkerInfo
from pipelines.batch.slots import SlotState, SlotTable, StoryTask, WorkerSlot
from pipelines.batch.spec import BatchOptions


@dataclass(frozen=True)
class WorkerStarted:
    slot: WorkerSlot
    info: WorkerInfo


@dataclass(frozen=True)
class WorkerStartFailed:
    slot: WorkerSlot
    reason: str
    init_failed: bool  # its constructor raised (e.g. the model cannot load)


@dataclass(frozen=True)
class StoryReturned:
    slot: WorkerSlot
    task: StoryTask
    outcome: StoryOutcome


@dataclass(frozen=True)
class StoryRaised:
    slot: WorkerSlot
    task: StoryTask
    error_type: str
    message: str


@dataclass(frozen=True)
class WorkerDiedUnderStory:
    slot: WorkerSlot
    task: StoryTask
    reason: str
    timed_out: bool  # the pool killed it for the story timeout


Completion = Union[WorkerStarted, WorkerStartFailed, StoryReturned, StoryRaised,
                   WorkerDiedUnderStory]


RESTART_PING_S = 1.0  # how soon a restarting worker is asked again whether it is ready


class _Call(enum.Enum):
    PING = "ping"
    STORY = "story"


class WorkerPool:
    """Story worker actors in the slots of a `SlotTable`."""

    def __init__(self, run_id: str, render, options: BatchOptions, out: str,
                 scorer_pools=None, progress=None, wrap_pipeline_for_tests=None):
        self.table = SlotTable(run_id, options.workers, options.replacement_limit)
        self.render = render
        self.options = options
        self.out = out
        self.scorer_pools = scorer_pools
        self.progress = progress
        self.wrap_pipeline_for_tests = wrap_pipeline_for_tests
        self._calls: dict = {}  # ObjectRef -> (_Call, WorkerSlot)
        self._pings_due: list[tuple[float, WorkerSlot]] = []  # slots of restarting actors

    def start_all(self) -> None:
        for slot in self.table.slots:
            self._start(slot)

    def _start(self, slot: WorkerSlot) -> None:
        import ray

        from actors.story_worker import StoryWorker

        remote = ray.remote(StoryWorker).options(
            name=slot.name, num_cpus=self.options.cpus_per_worker,
            num_gpus=self.options.gpus_per_worker,
            max_restarts=self.options.worker_max_restarts, max_task_retries=0)
        handles = self.scorer_pools.handles(slot.index) if self.scorer_pools else None
        slot.handle = remote.remote(
            slot.name, self.render, handles, self.progress,
            torch_threads=self.options.torch_threads, consistency=self.options.consistency,
            wrap_pipeline_for_tests=self.wrap_pipeline_for_tests)
        slot.state = SlotState.STARTING
        self._calls[slot.handle.ping.remote()] = (_Call.PING, slot)

    def submit(self, slot: WorkerSlot, task: StoryTask) -> None:
        self.table.assign(slot, task, time.monotonic())
        ref = slot.handle.render_story.remote(task.story.script, self.out, task.attempts)
        self._calls[ref] = (_Call.STORY, slot)

    def wait(self, timeout_s: float) -> list[Completion]:
        """What came back within `timeout_s` (at least one result, or none on timeout)."""
        import ray

        now = time.monotonic()
        due_now = [slot for due, slot in self._pings_due if due <= now]
        self._pings_due = [(due, slot) for due, slot in self._pings_due if due > now]
        for slot in due_now:
            self._calls[slot.handle.ping.remote()] = (_Call.PING, slot)
        if not self._calls:  # nothing in flight (pings of restarting workers may be due)
            time.sleep(timeout_s)
            return []
        ready, _ = ray.wait(list(self._calls), num_returns=1, timeout=timeout_s)
        out = []
        for ref in ready:
            call, slot = self._calls.pop(ref)
            done = self._pinged(slot, ref) if call is _Call.PING else self._returned(slot, ref)
            if done is not None:
                out.append(done)
        return out

    def _pinged(self, slot: WorkerSlot, ref) -> Completion | None:
        import ray

        try:
            info = ray.get(ref)
        except ray.exceptions.ActorUnavailableError:
            # Ray is restarting it (max_restarts): ask again shortly, it is not lost.
            self._pings_due.append((time.monotonic() + RESTART_PING_S, slot))
            return None
        except ray.exceptions.RayActorError as exc:
            init_failed = bool(getattr(exc, "actor_init_failed", False))
            what = "could not load the model" if init_failed else "died while starting"
            return WorkerStartFailed(slot, f"story worker {slot.name} {what}: {_short(exc)}",
                                     init_failed)
        self.table.ready(slot, info.pid)
        return WorkerStarted(slot, info)

    def _returned(self, slot: WorkerSlot, ref) -> Completion:
        import ray

        try:
            outcome = ray.get(ref)
        except ray.exceptions.RayActorError as exc:
            # The worker died under the story: Ray restarts it (or it is replaced); the
            # story resumes from its last committed shot on its next attempt.
            timed_out = self.table.take_timeout(slot)
            task = self.table.release(slot, SlotState.RECOVERING)
            self._calls[slot.handle.ping.remote()] = (_Call.PING, slot)
            return WorkerDiedUnderStory(slot, task, f"worker {slot.name} died: {_short(exc)}",
                                        timed_out)
        except ray.exceptions.RayTaskError as exc:
            cause = exc.cause if getattr(exc, "cause", None) is not None else exc
            task = self.table.release(slot)
            return StoryRaised(slot, task, type(cause).__name__, str(cause))
        task = self.table.release(slot)
        return StoryReturned(slot, task, outcome)

    def kill_overdue(self) -> list[WorkerSlot]:
        """Kill (Ray restarts them) the workers whose story overstayed the timeout."""
        import ray

        late = self.table.overdue(time.monotonic(), self.options.story_timeout_s)
        for slot in late:
            ray.kill(slot.handle, no_restart=False)
        return late

    def replace(self, slot: WorkerSlot) -> bool:
        """A lost worker: a new incarnation in its slot (True), or the slot is gone for good
        because the replacements are used up (False)."""
        self._kill(slot)
        if not self.table.replace(slot):
            return False
        self._start(slot)
        return True

    def close(self) -> None:
        for slot in self.table.slots:
            self._kill(slot)

    @staticmethod
    def _kill(slot: WorkerSlot) -> None:
        import ray

        if slot.handle is None:
            return
        try:  # gone for good, so a replacement never races its restart
            ray.kill(slot.handle, no_restart=True)
        except Exception:
            pass


_ERROR_LINE = re.compile(r"^\s*(?:[\w.]+\.)?(\w*(?:Error|Exception|Exit)\w*): .+")


def _short(exc: BaseException) -> str:
    """One line about an actor error: the underlying exception's own line when the
    message carries a traceback (e.g. why an actor constructor failed), else the first."""
    lines = str(exc).strip().splitlines()
    causes = [line.strip() for line in lines if _ERROR_LINE.match(line)]
    causes = [c for c in causes if not c.startswith(("ray.exceptions.", "RayActorError",
                                                      "ActorDiedError"))]
    if causes:
        return causes[-1]
    return lines[0] if lines else type(exc).__name__
