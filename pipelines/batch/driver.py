"""The batch driver: render every script of a source once, nothing lost, workers kept busy.

    run_batch(spec: BatchSpec, *, on_event=None) -> BatchSummary

1. Before Ray: the output URI and the script source are checked (the planner's first item
   is read: a wrong `--scripts` fails here), the run id is chosen, and the output lock
   (`output_lock.OutputLock(out, "render")`, the lock `storymem render` takes) is taken -
   or, with `spec.lock_token`, the lease a flow handed over. It is held until the run
   ends; a second run on the same output fails here naming the holder (after
   `spec.lock_wait_s`). A lost lease (another run took it over) stops the run: nothing more is
   submitted, the workers are killed, `OutputLockLost` is raised.
2. Connect to Ray (`pipelines.ray_runtime`), check its resources, start the shared scorer
   pools (none when memory is off) and the story workers (`worker_pool`); scorer models
   and worker pipelines load in parallel. The config hash is the spec's: every worker
   checks that it loaded what the spec names and reports the hash it renders with.
3. The feed (`story_feed`) hands a worker the next story when it is free; the recorder
   (`recorder`) writes each story outcome and error row as its own part the moment it is
   known; the view (`progress`) and the per-worker logs (`worker_logs`) follow the events.
   Worker logs reach storage every `log_flush_s` seconds (`worker_logs`).
4. At the end: the parts are compacted into stories.parquet / shots.parquet /
   errors.parquet, the log segments into one log per worker, summary.json last.

A story is in flight on one worker at a time, every file has a deterministic key and
stories resume from their last committed shot, so a retried story, a replaced worker or a
re-run of the same run id never duplicates or loses work.
"""
from __future__ import annotations

import collections
import datetime as _dt
import itertools
import logging
import time
from typing import Any, Callable, Iterator

from actors.batch_events import (BatchEvent, ScorerReplaced, ShotRendered, StoryDone,
                                 StoryFailed, StoryRetry, StorySubmitted, WorkerDied,
                                 WorkerLost, WorkerReady)
from actors.story_outcome import RunnerStatus, StoryOutcome
from storymem_model.output_lock import OutputLock, default_owner
from pipelines.batch.progress import ProgressView
from pipelines.batch.recorder import RunRecorder
from pipelines.batch.slots import StoryTask, WorkerSlot
from pipelines.batch.spec import BatchSpec, new_run_id
from pipelines.batch.story_feed import StoryFeed
from pipelines.batch.summary import (BatchSummary, SummaryTables, scorer_request_counts,
                                     shot_costs)
from pipelines.batch.worker_logs import WorkerLogs
from pipelines.batch.worker_pool import (StoryRaised, StoryReturned, WorkerDiedUnderStory,
                                         WorkerPool, WorkerStarted, WorkerStartFailed)
from pipelines.ray_runtime import ray_session
from pipelines.run_tables import (ErrorRow, ErrorStage, StoryRow, StoryStatus, write_summary)
from pipelines.story_planner import plan_items
from storymem_model import storage

log = logging.getLogger("storymem.batch")

EventCallback = Callable[[BatchEvent], None]
POLL_S = 0.2
PROGRESS_DRAIN_TIMEOUT_S = 30


class BatchError(RuntimeError):
    """The batch as a whole cannot run (too few resources, no worker can start)."""


class OutputLockLost(BatchError):
    """Another run took the output lock over: the batch stopped (its rows are kept)."""


def run_batch(spec: BatchSpec, *, on_event: EventCallback | None = None,
              wrap_pipeline_for_tests: Callable[[Any], Any] | None = None) -> BatchSummary:
    """Render every story of `spec.scripts` into `spec.out`; returns the run summary (also
    written as summary.json). `on_event` receives every `actors.batch_events` event.

    Raises BatchError when the batch cannot run at all (ScriptSourceError for an unusable
    source, RayConnectionError, ScorerPoolError, StorageError); a failing story never
    raises. `wrap_pipeline_for_tests(pipeline) -> pipeline` is a test hook only: each worker
    wraps its loaded pipeline with it (to inject a failing or hanging generation).
    """
    if not isinstance(spec, BatchSpec):
        raise TypeError(f"run_batch takes a BatchSpec, got {type(spec).__name__}")
    spec = spec.replace(out=spec.out.rstrip("/"), run_id=spec.run_id or new_run_id())
    storage.filesystem(spec.out)  # an unusable out fails here, before any actor starts
    items = _started(plan_items(spec.scripts, spec.out, spec.render.config_hash,
                                exclude=spec.out))  # so does an unusable source
    lock = OutputLock(spec.out, "render",
                      owner=f"storymem batch run {spec.run_id} ({default_owner()})",
                      ttl_s=spec.lock_ttl_s, wait_s=spec.lock_wait_s, token=spec.lock_token)
    lock.acquire()  # OutputLockedError naming the holder
    try:
        with ray_session(spec.ray_address):
            return BatchDriver(spec, items, on_event, wrap_pipeline_for_tests, lock).run()
    finally:
        lock.release()


class BatchDriver:
    """Composes the pools, the feed, the recorder and the view for one run."""

    def __init__(self, spec: BatchSpec, items: Iterator, on_event: EventCallback | None,
                 wrap_pipeline_for_tests=None, lock: OutputLock | None = None):
        self.spec = spec
        self.lock = lock
        self.options = spec.options
        self.run_id = spec.run_id
        self.config_hash = spec.render.config_hash
        self.items = items
        self.on_event = on_event
        self.wrap_pipeline_for_tests = wrap_pipeline_for_tests
        self.shot_events: collections.Counter = collections.Counter()
        self.shots_now = 0  # shots rendered by this invocation
        self.story_wall_s = 0.0
        self.worker_deaths = 0
        self.story_retries = 0
        self.first_ready: float | None = None
        self.loop_end = 0.0

    # -- the whole run -----------------------------------------------------------------
    def run(self) -> BatchSummary:
        import ray

        from actors.progress_reporter import ProgressReporter

        self.started = time.time()
        self._check_resources()
        self.recorder = RunRecorder.open(self.spec.out, self.run_id)
        if self.recorder.recorded_before:
            log.info("batch %s: continuing; %d rows recorded before", self.run_id,
                     self.recorder.recorded_before)
        self.feed = StoryFeed(self.items, self.recorder, self._emit,
                              config_hash=self.config_hash,
                              consistency=self.options.consistency)
        prefix = f"storymem-{self.run_id}"
        self.scorer_pools = self._start_scorer_pools(prefix)
        self.progress = ray.remote(num_cpus=0)(ProgressReporter).options(
            name=f"{prefix}-progress").remote()
        self.view = ProgressView(self.run_id, self.options.progress)
        self.logs = WorkerLogs(self.recorder.uri, flush_s=self.options.log_flush_s)
        self.pool = WorkerPool(self.run_id, self.spec.render, self.options, self.spec.out,
                               self.scorer_pools, self.progress, self.wrap_pipeline_for_tests)
        try:
            self.pool.start_all()
            self._loop()
            self.loop_end = time.time()
            self._drain_progress()
            self._check_lock()
            return self._finish()
        finally:
            self.view.close()
            self.pool.close()
            if self.scorer_pools is not None:
                self.scorer_pools.kill()
            ray.kill(self.progress, no_restart=True)
            self.logs.close()

    def _start_scorer_pools(self, prefix: str):
        if self.spec.render.scorers is None:  # memory off: nothing is scored
            return None
        from pipelines.scorer_pools import start_scorer_pools
        from storymem_model.model_identity import ScorerIdentity

        config = self.spec.render.config  # the scorer ids the config hash names
        identity = ScorerIdentity(config.embedder_id, config.gate_id, config.gate_threshold)
        return start_scorer_pools(self.spec.render.scorers, identity, self.options.scorers,
                                  name_prefix=prefix, wait=False, clients=self.options.workers)

    def _check_resources(self) -> None:
        import ray

        opts, sc = self.options, self.options.scorers
        scorer_actors = 0 if self.spec.render.scorers is None else sc.clip_actors + sc.gate_actors
        need_cpu = opts.workers * opts.cpus_per_worker + scorer_actors * sc.cpus_per_actor
        need_gpu = opts.workers * opts.gpus_per_worker + scorer_actors * sc.gpus_per_actor
        have = ray.cluster_resources()
        short = []
        if need_cpu > have.get("CPU", 0) + 1e-9:
            short.append(f"{need_cpu:g} CPUs (cluster has {have.get('CPU', 0):g})")
        if need_gpu > have.get("GPU", 0) + 1e-9:
            short.append(f"{need_gpu:g} GPUs (cluster has {have.get('GPU', 0):g})")
        if short:
            message = (f"the batch needs {' and '.join(short)}: lower --workers, "
                       f"--cpus-per-worker or --gpus-per-worker")
            if self.spec.ray_address:  # a cluster may scale up: wait for it
                log.warning("%s; waiting for the cluster to provide them", message)
            else:
                raise BatchError(message)

    def _check_lock(self) -> None:
        if self.lock is not None and self.lock.lost:
            raise OutputLockLost(
                f"the output lock {self.lock.uri} was lost (another run took it over after "
                f"this one could not renew it within {self.lock.ttl_s:g} s); the batch "
                f"stopped: nothing more is submitted and the workers are killed. Rows "
                f"recorded so far are kept: run the same command again (same run id) to "
                f"continue once the other run is done")

    def _loop(self) -> None:
        table = self.pool.table
        while True:
            self._check_lock()
            for slot in table.idle():
                task = self.feed.next()
                self.view.listed(self.feed.listed, self.feed.listing_done)
                if task is None:
                    break
                self._submit(slot, task)
            if not table.any_busy() and self.feed.exhausted:
                return
            if not table.any_alive():
                raise BatchError("every story worker is gone (see the errors above)")
            completions = self.pool.wait(POLL_S)
            self._drain_progress()
            self._supervise_scorers()
            self.logs.flush()
            for completion in completions:
                self._handle(completion)
            for slot in self.pool.kill_overdue():
                log.error("story %s: no result after %.0f s on %s; killing the worker",
                          slot.task.story_id, self.options.story_timeout_s, slot.name)

    def _supervise_scorers(self) -> None:
        """Replace scorer actors that died past their Ray restarts (ScorerPoolError, which
        stops the run, once the replacements are used up)."""
        if self.scorer_pools is None:
            return
        for actor, reason in self.scorer_pools.supervise():
            log.error("scorer actor %s died past its restarts (%s); replaced", actor, reason)
            self._emit(ScorerReplaced(actor=actor, reason=reason))

    def _submit(self, slot: WorkerSlot, task: StoryTask) -> None:
        self.pool.submit(slot, task)
        if task.attempts > 1:
            self.story_retries += 1
        self._emit(StorySubmitted(worker=slot.name, story_id=task.story_id,
                                  attempt=task.attempts))

    # -- what comes back -----------------------------------------------------------------
    def _handle(self, completion) -> None:
        if isinstance(completion, WorkerStarted):
            self._worker_started(completion)
        elif isinstance(completion, WorkerStartFailed):
            self._worker_lost(completion)
        elif isinstance(completion, StoryReturned):
            self._story_done(completion.task, completion.outcome)
        elif isinstance(completion, StoryRaised):
            self._story_failed(completion.task, completion.error_type, completion.message)
        elif isinstance(completion, WorkerDiedUnderStory):
            self.worker_deaths += 1
            if completion.timed_out:
                self._story_failed(completion.task, "StoryTimeout", (
                    f"no result after {self.options.story_timeout_s:g} s (--story-timeout) "
                    f"on worker {completion.slot.name}; the worker was killed"))
            else:
                self._story_failed(completion.task, "WorkerDied", completion.reason)
            self._emit(WorkerDied(worker=completion.slot.name,
                                  story_id=completion.task.story_id,
                                  attempt=completion.task.attempts))

    def _worker_started(self, started: WorkerStarted) -> None:
        info = started.info
        if info.config_hash != self.config_hash:
            raise BatchError(f"worker {info.worker} renders with config {info.config_hash}, "
                             f"the batch spec with {self.config_hash}")
        if self.first_ready is None:
            self.first_ready = time.time()
            log.info("batch %s: config %s, %d worker(s)", self.run_id, self.config_hash,
                     self.options.workers)
        self._emit(WorkerReady(worker=info.worker, pid=info.pid, load_s=info.load_s))

    def _worker_lost(self, lost: WorkerStartFailed) -> None:
        log.error("%s", lost.reason)
        self._emit(WorkerLost(worker=lost.slot.name, reason=lost.reason))
        if lost.init_failed and not self.pool.table.ever_ready:
            # No worker has ever started: the model (or a scorer) cannot load. Stop now.
            raise BatchError(lost.reason)
        if not self.pool.replace(lost.slot) and self.scorer_pools is not None:
            # the scorer actors stop waiting for this worker's requests
            self.scorer_pools.set_clients(self.pool.table.live_indices())

    def _story_done(self, task: StoryTask, outcome: StoryOutcome) -> None:
        story = task.story
        # "skipped" on a retry means an earlier attempt of this run committed the story.
        skipped = outcome.status is RunnerStatus.SKIPPED and task.attempts == 1
        status = StoryStatus.SKIPPED if skipped else StoryStatus.RENDERED
        # Shots of attempts that died are known from their progress events.
        shots = max(outcome.shots_rendered, self.shot_events[story.story_id])
        self.shots_now += shots
        self.story_wall_s += outcome.wall_s
        storage.remove_unfinished_writes(story.story_uri)  # of attempts whose worker was killed
        consistency = outcome.consistency
        self._logs_up_to_now()  # a recorded story always has its log lines on storage
        self.recorder.record_story(StoryRow(
            run_id=self.run_id, position=story.position, source=story.source,
            story_id=story.story_id, story_name=story.story_name, status=status.value,
            num_shots=outcome.shots_total, shots_rendered=shots, attempts=task.attempts,
            config_hash=outcome.config_hash, story_uri=outcome.story_uri,
            video_uri=outcome.video_uri, worker=outcome.worker, wall_s=outcome.wall_s,
            consistency_all_pairs=consistency.all_pairs if consistency else None,
            consistency_top10=consistency.top10 if consistency else None,
            gpu_seconds=self.options.gpus_per_worker * outcome.shot_seconds,
            denoise_seconds=outcome.denoise_seconds,
            model_evaluations=outcome.model_evaluations))
        self._emit(StoryDone(worker=outcome.worker, story_id=story.story_id,
                             status=status.value, attempt=task.attempts,
                             shots_rendered=outcome.shots_rendered))

    def _story_failed(self, task: StoryTask, error_type: str, message: str) -> None:
        story = task.story
        if task.can_retry(self.options.max_attempts):
            log.warning("story %s: attempt %d failed (%s: %s); retrying", story.story_id,
                        task.attempts, error_type, message.splitlines()[0] if message else "")
            self.feed.retry(task)
            self._emit(StoryRetry(story_id=story.story_id, attempt=task.attempts,
                                  error_type=error_type, message=message))
            return
        log.error("story %s failed after %d attempts: %s: %s", story.story_id, task.attempts,
                  error_type, message)
        shots = self.shot_events[story.story_id]
        self.shots_now += shots
        storage.remove_unfinished_writes(story.story_uri)
        # The error part first: a failed story row always has its error row on storage.
        self._logs_up_to_now()
        self.recorder.record_error(ErrorRow(
            run_id=self.run_id, position=story.position, stage=ErrorStage.RENDER.value,
            source=story.source, story_id=story.story_id, error_type=error_type,
            message=message, attempts=task.attempts))
        self.recorder.record_story(StoryRow(
            run_id=self.run_id, position=story.position, source=story.source,
            story_id=story.story_id, story_name=story.story_name,
            status=StoryStatus.FAILED.value, num_shots=story.num_shots, shots_rendered=shots,
            attempts=task.attempts, config_hash=self.config_hash, story_uri=story.story_uri,
            error=f"{error_type}: {message}"))
        self._emit(StoryFailed(story_id=story.story_id, attempts=task.attempts,
                               error_type=error_type, message=message))

    # -- events ----------------------------------------------------------------------------
    def _logs_up_to_now(self) -> None:
        """The workers' events so far drained and their log lines written to storage."""
        self._drain_progress()
        self.logs.flush(force=True)

    def _drain_progress(self) -> None:
        import ray

        try:
            events = ray.get(self.progress.drain.remote(), timeout=PROGRESS_DRAIN_TIMEOUT_S)
        except Exception as exc:  # progress is best effort, never fatal
            log.warning("progress events unavailable: %s", exc)
            return
        for event in events:
            self._emit(event)

    def _emit(self, event: BatchEvent) -> None:
        if isinstance(event, ShotRendered):
            self.shot_events[event.story_id] += 1
        self.logs.write(event)
        self.view.update(event)
        if self.on_event is not None:
            self.on_event(event)

    # -- the run folder --------------------------------------------------------------------
    def _finish(self) -> BatchSummary:
        wall_s = time.time() - self.started
        scorer_stats = self.scorer_pools.stats() if self.scorer_pools is not None else {}
        tables = self.recorder.finish()
        log_uris = self.logs.compact()
        counts = self.recorder.counts()
        failed = counts[StoryStatus.FAILED.value] + counts["invalid"]
        requests, batches = scorer_request_counts(scorer_stats)
        hours = wall_s / 3600
        first_ready = self.first_ready or self.loop_end
        summary = BatchSummary(
            run_id=self.run_id,
            status="completed_with_failures" if failed else "completed",
            scripts=self.spec.scripts, out=self.spec.out, run_uri=self.recorder.uri,
            config_hash=self.config_hash, config=self.spec.render.config.to_dict(),
            started_at=_iso(self.started), finished_at=_iso(time.time()), wall_s=wall_s,
            startup_s=(self.first_ready or time.time()) - self.started,
            render_wall_s=self.loop_end - first_ready,
            listed=self.feed.listed, rendered=counts[StoryStatus.RENDERED.value],
            skipped=counts[StoryStatus.SKIPPED.value], failed=failed,
            failed_render=counts[StoryStatus.FAILED.value], invalid=counts["invalid"],
            shots_rendered=sum(r.shots_rendered for r in self.recorder.stories),
            shots_in_run_tables=tables.shot_rows,
            shots_per_hour=self.shots_now / hours if hours > 0 else 0.0,
            workers=self.options.workers, gpus_per_worker=self.options.gpus_per_worker,
            gpu_hours=self.options.workers * self.options.gpus_per_worker * hours,
            busy_gpu_hours=self.options.gpus_per_worker * self.story_wall_s / 3600,
            worker_deaths=self.worker_deaths,
            worker_replacements=self.pool.table.replacements,
            story_retries=self.story_retries,
            scorer_replacements=(self.scorer_pools.replacements
                                 if self.scorer_pools is not None else 0),
            recorded_before=self.recorder.recorded_before, scorers=scorer_stats,
            scorer_calls_per_shot=requests / self.shots_now if self.shots_now else 0.0,
            scorer_mean_batch_requests=requests / batches if batches else 0.0,
            **shot_costs(self.recorder.stories),
            tables=SummaryTables(stories=tables.stories, shots=tables.shots,
                                 errors=tables.errors, logs=log_uris),
            summary_uri=storage.join(self.recorder.uri, "summary.json"))
        write_summary(self.recorder.uri, summary.to_dict())
        log.info("batch %s: %d rendered, %d skipped, %d failed in %.1f s; run tables at %s",
                 self.run_id, summary.rendered, summary.skipped, failed, wall_s,
                 self.recorder.uri)
        return summary


def _started(items: Iterator) -> Iterator:
    """Read the first item now, so an unusable source raises before any actor starts."""
    iterator = iter(items)
    try:
        first = next(iterator)
    except StopIteration:
        return iter(())
    return itertools.chain([first], iterator)


def _iso(ts: float) -> str:
    return _dt.datetime.fromtimestamp(ts, _dt.timezone.utc).isoformat(timespec="seconds")
